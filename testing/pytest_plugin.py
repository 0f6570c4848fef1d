"""pytest plugin (entry point ``pytest11: blockzoo``), loaded wherever blockzoo is installed.

It stays light at load time (imports nothing heavy). It adds the ``--blockzoo-seed`` option
(pins every conformance check's seed, like ``BLOCKZOO_TEST_SEED``) and the helper
:func:`conformance_tests`, so a plugin author's test file is two lines::

    from blockzoo.testing.pytest_plugin import conformance_tests
    test_conformance = conformance_tests("myfamily.mycomponent")
"""

from __future__ import annotations

import os


def pytest_addoption(parser):
    parser.addoption("--blockzoo-seed", default=None, help="pin the seed of blockzoo conformance checks")


def pytest_configure(config):
    seed = config.getoption("--blockzoo-seed", default=None)
    if seed is not None:
        os.environ["BLOCKZOO_TEST_SEED"] = str(seed)


def conformance_tests(*components: str, backends=None, dtypes=None):
    """A parametrized test function checking every backend of ``components`` vs its reference."""
    import pytest

    from .conformance import check, matrix

    cases = matrix(list(components) or None, backends, dtypes)

    @pytest.mark.parametrize("cc", cases, ids=[c.id for c in cases])
    def test_conformance(cc):
        check(cc)
    return test_conformance
