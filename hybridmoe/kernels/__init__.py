"""Compute kernels: `cpu` (numba, over GGUF quantized blocks) and `gpu` (triton)."""
