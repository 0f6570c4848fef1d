"""The component x backend x dtype x case matrix, generated from the registry.

Which part of the matrix runs is chosen by environment (tox envs split it):
BLOCKZOO_TEST_BACKENDS, BLOCKZOO_TEST_COMPONENTS, BLOCKZOO_TEST_DTYPES, BLOCKZOO_TEST_DEVICE.
Triton backends are collected only where they can run (a GPU, or TRITON_INTERPRET=1).
"""

import pytest

from blockzoo.testing import check, matrix

CASES = matrix()


@pytest.mark.parametrize("cc", CASES, ids=[c.id for c in CASES])
def test_backend_matches_reference(cc):
    check(cc)


def test_matrix_is_not_empty():
    assert CASES, "the generated matrix selected no case: check BLOCKZOO_TEST_* settings"
