"""Triton kernels with the PyTorch references that define them."""
