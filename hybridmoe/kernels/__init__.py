"""Compute kernels: `cpu` (numba, over GGUF quantized blocks) and `gpu` (triton)."""
from functools import cache
from importlib import import_module


@cache
def gpu_kernel(module: str, name: str):
    """kernels.gpu.<module>.<name>, imported at its first use (triton reads its interpreter setting when kernels are
    defined, so importing early would fix that choice for the whole process); None without triton."""
    try:
        return getattr(import_module(f"{__name__}.gpu.{module}"), name)
    except ImportError:  # pragma: no cover - triton is missing
        return None
