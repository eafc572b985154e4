"""Paged KV-cache operations: Triton kernels for CUDA, PyTorch references for CPU and tests."""
