"""Triton kernels with the PyTorch references that define them (DESIGN.md §5)."""
