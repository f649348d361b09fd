"""Compute kernels: `cpu` (numba, over GGUF quantized blocks) and `gpu` (triton)."""
import os
import warnings
from functools import cache
from importlib import import_module

import torch


class _FirstUse:
    """A GPU kernel that the eager torch code it replaces stands in for if it fails at its first call (a Triton
    build or compile error on this GPU): then it warns once and returns None from then on, and the caller takes its
    eager path. Errors after a first success, out-of-memory and the wrappers' input checks (ValueError) propagate."""

    def __init__(self, name: str, fn):
        self.name, self.fn, self.state = name, fn, None  # None: untried, True: works, False: failed

    def __call__(self, *args, **kwargs):
        if self.state is False:
            return None
        if self.state:
            return self.fn(*args, **kwargs)
        try:
            out = self.fn(*args, **kwargs)
        except (torch.OutOfMemoryError, ValueError):
            raise
        except Exception as err:  # whatever the compiler raised: the eager code does the same work
            self.state = False
            warnings.warn(f"GPU kernel {self.name} failed at its first use ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); using the eager torch code instead",
                          RuntimeWarning, stacklevel=3)
            return None
        self.state = True
        return out


# The one-launch GPU kernels that stand in for eager torch code (norms, rope, routing, the experts' sum); the eager
# code does the same work. HYBRIDMOE_GPU_KERNELS=0 turns them off (to rule them out when something looks wrong).
USE_GPU_KERNELS = os.environ.get("HYBRIDMOE_GPU_KERNELS", "1") != "0"
ALSO_ON_CPU = False  # tests only: take the GPU kernels for CPU tensors too (run by Triton's interpreter)


def gpu_kernel_for(t: torch.Tensor, module: str, name: str):
    """gpu_kernel(module, name) where `t` is a CUDA tensor (or ALSO_ON_CPU is set) and USE_GPU_KERNELS, else None."""
    return gpu_kernel(module, name) if USE_GPU_KERNELS and (t.is_cuda or ALSO_ON_CPU) else None


@cache
def gpu_kernel(module: str, name: str):
    """kernels.gpu.<module>.<name>, imported at its first use (triton reads its interpreter setting when kernels are
    defined, so importing early would fix that choice for the whole process); None without triton. Calling it
    returns None where the kernel failed at its first call (see _FirstUse): callers then run their eager code."""
    try:
        return _FirstUse(f"{module}.{name}", getattr(import_module(f"{__name__}.gpu.{module}"), name))
    except ImportError:  # pragma: no cover - triton is missing
        return None
