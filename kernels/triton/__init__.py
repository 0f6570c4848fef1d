"""Triton kernels. Shared building blocks first: the online-softmax attention core."""
