"""Kernels: Triton (GPU, or CPU through Triton's interpreter)."""
