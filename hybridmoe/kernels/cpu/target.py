"""The code generation target of the kernels: 512-bit vectors on AVX-512 CPUs.

LLVM's tuning for recent Intel server cores prefers 256-bit vectors (to spare the clock in mixed code); for these
streaming kernels the full width is faster (Xeon, 16 threads: repacked Q4_K 35-39 -> 46-51 GB/s, see bench/RESULTS.md).
This sets numba's target features when the package is imported. Numba fixes its target when the first jitted
function of the process is defined, so it only takes effect if no other numba code came first; NUMBA_CPU_FEATURES,
if set, wins.
"""
from __future__ import annotations

import llvmlite.binding as llvm
import numba


def use_full_vector_width() -> bool:
    """Let numba's LLVM emit 512-bit vectors where the CPU has AVX-512; True if the setting was applied."""
    if numba.config.CPU_FEATURES is not None:
        return False
    features = llvm.get_host_cpu_features()
    if not features.get("avx512f", False):
        return False
    numba.config.CPU_FEATURES = features.flatten() + ",-prefer-256-bit"
    return True
