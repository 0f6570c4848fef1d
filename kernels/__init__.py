"""Kernels shared by components: ``kernels.triton`` (GPU, or CPU under TRITON_INTERPRET=1) and
``kernels.numba`` (CPU). Import submodules lazily: importing triton or numba is slow."""

# output allocation for kernel wrappers (also third-party ones): NaN-poisoned inside the
# conformance kit's checks, so an element a kernel forgets to write fails the test
from ._alloc import empty, empty_like, poisoned  # noqa: E402,F401  (torch only; cheap)
