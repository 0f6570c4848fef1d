"""Numba CPU kernels, same sharing rule as the Triton ones."""
