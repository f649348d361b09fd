"""The code generation target of the kernels: 512-bit vectors on AVX-512 CPUs; where their compiled code is cached.

LLVM's tuning for recent Intel server cores prefers 256-bit vectors (to spare the clock in mixed code); for these
streaming kernels the full width is faster (Xeon, 16 threads: repacked Q4_K 35-39 -> 46-51 GB/s, see bench/RESULTS.md).
This sets numba's target features when the package is imported. Numba fixes its target when the first jitted
function of the process is defined, so it only takes effect if no other numba code came first; NUMBA_CPU_FEATURES,
if set, wins.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

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


FRESH = False  # the kernels' cache was empty when this process started: each kernel compiles on first use


def use_source_keyed_cache() -> str | None:
    """Keep numba's compiled kernels under a directory named by a hash of these kernels' sources (and numba's
    version). numba checks a cached function against its own file only, and a kernel's cached code includes the
    functions it calls from other files: after an upgrade that changed one of those, the old code would run. A new
    hash starts a fresh cache instead. Under NUMBA_CACHE_DIR if set, else the user's cache directory. -> the path,
    or None where it could not be made (numba then keeps its default, beside the sources)."""
    here = Path(__file__).parent
    digest = hashlib.sha256(numba.__version__.encode())
    for path in sorted(here.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    base = Path(numba.config.CACHE_DIR or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    if not numba.config.CACHE_DIR:
        base = base / "hybridmoe" / "numba"
    global FRESH
    path = base / digest.hexdigest()[:16]
    try:
        path.mkdir(parents=True, exist_ok=True)
        FRESH = not any(path.iterdir())
    except OSError:
        return None
    numba.config.CACHE_DIR = str(path)
    return str(path)


def first_run_note() -> str | None:
    """What to tell a user whose first generation will wait for the compiler, or None."""
    if not FRESH:
        return None
    return (f"first run of this version's CPU kernels on this machine: each compiles the first time it runs (a few "
            f"minutes in all, once; kept in {numba.config.CACHE_DIR})")
