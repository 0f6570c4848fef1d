"""pytest plugin (entry point ``pytest11: blockzoo``), loaded wherever blockzoo is installed.

It stays light at load time (imports nothing heavy). It adds the ``--blockzoo-seed`` option
(pins every conformance check's seed, like ``BLOCKZOO_TEST_SEED``) and the helper
:func:`conformance_tests`, so a plugin author's test file is two lines::

    from blockzoo.testing import conformance_tests
    TestConformance = conformance_tests("myfamily.mycomponent")
"""

from __future__ import annotations

import os


def pytest_addoption(parser):
    parser.addoption("--blockzoo-seed", default=None, help="pin the seed of blockzoo conformance checks")


def pytest_configure(config):
    seed = config.getoption("--blockzoo-seed", default=None)
    if seed is not None:
        os.environ["BLOCKZOO_TEST_SEED"] = str(seed)


def conformance_tests(*components: str, backends=None, dtypes=None, spec=True):
    """A pytest test class for ``components`` (default: everything registered). Assign it to a
    name starting with ``Test``. Its tests:

    - ``test_registered``: each component is registered and its package recorded no plugin
      failure (import, hook names, duplicate ids, missing reference);
    - ``test_backend_matches_reference[<component>-<backend>-<case>-<dtype>]``: every backend that
      can run here, on every case of ``Component.cases`` and dtype it declares, against the fp32
      reference: outputs and every input gradient, NaN-poisoned outputs, fresh random inputs
      (seed printed; ``--blockzoo-seed`` / ``BLOCKZOO_TEST_SEED`` replays);
    - ``test_every_backend_is_checked``: each backend available here is in that matrix at least
      once (a backend whose capabilities exclude every case fails here instead of going untested);
    - ``test_spec_round_trip[<component>-<params>]`` (``spec=True``): the component in a spec,
      YAML round trip, ``blockzoo schema`` validation, build + forward + backward
      (:mod:`blockzoo.testing.spec_check`).

    ``backends`` / ``dtypes`` restrict the matrix (default: ``BLOCKZOO_TEST_BACKENDS`` /
    ``BLOCKZOO_TEST_DTYPES`` or all).
    """
    import pytest

    from ..registry import RegistryError, get_manager, get_registry
    from .conformance import check, matrix
    from .spec_check import SLOTS, params_sets, spec_round_trip

    reg = get_registry()
    wanted = list(components) or sorted(reg.components)
    known = [c for c in wanted if c in reg.components]
    cases = matrix(known, backends, dtypes) if known else []
    trips = [(cid, label, p) for cid in known if reg.components[cid].slot in SLOTS
             for label, p in params_sets(cid)] if spec else []

    class TestConformance:
        def test_registered(self):
            failures = get_manager().failures
            missing = [c for c in wanted if c not in reg.components]
            if missing:
                detail = "".join(f"\n  {f.plugin} ({f.dist} {f.version}) at {f.stage}: {f.error}" for f in failures)
                raise RegistryError(f"not registered: {', '.join(missing)}; plugin failures:{detail or ' none'}")
            owners = {reg.components[c].owner for c in known}
            mine = [f for f in failures if any(f.dist in o or f.plugin in o for o in owners)]
            assert not mine, "plugin failures: " + "; ".join(f"{f.plugin} at {f.stage}: {f.error}" for f in mine)

        @pytest.mark.parametrize("cc", cases, ids=[c.id for c in cases])
        def test_backend_matches_reference(self, cc):
            check(cc)

        def test_every_backend_is_checked(self):
            covered = {(c.component, c.backend) for c in cases}
            chosen = set(backends) if backends else None
            if chosen is None:
                from .conformance import _selected
                chosen = _selected("BLOCKZOO_TEST_BACKENDS")
            unchecked = []
            for cid in known:
                if reg.components[cid].cases is None:
                    unchecked.append(f"{cid}: the component declares no cases()")
                    continue
                for be in reg.backends_for(cid):
                    if chosen and be.name not in chosen:
                        continue
                    if be.capabilities.environment_reasons():
                        continue
                    if (cid, be.name) not in covered:
                        unchecked.append(f"{cid}:{be.name}: no case and dtype it can run here")
            assert not unchecked, "untested backends:\n  " + "\n  ".join(unchecked)

        @pytest.mark.parametrize("cid,label,params", trips, ids=[f"{c}-{lbl}" for c, lbl, _ in trips])
        def test_spec_round_trip(self, cid, label, params):
            spec_round_trip(cid, params)

    return TestConformance
