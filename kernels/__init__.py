"""Kernels shared by components: ``kernels.triton`` (GPU, or CPU under TRITON_INTERPRET=1) and
``kernels.numba`` (CPU). Import submodules lazily: importing triton or numba is slow."""
