"""Kernels: Triton (GPU, or CPU through Triton's interpreter); the C++ CPU ops' definition,
loader and PyTorch stand-ins (cpu.py, cpu_reference.py)."""
