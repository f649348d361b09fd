"""The 8-bit kernels on a CPU without AVX-512 (most desktop CPUs): their intrinsics fall back to generic vector code
(`simd.py`), which must compute the same sums. Run in a separate process that tells numba the target is an AVX2
machine, with its own kernel cache."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import numpy as np
from hybridmoe.kernels import cpu
from hybridmoe.kernels.cpu.simd import _has
from hybridmoe.quant import dequantize, get_format, random_blocks

assert not _has("avx512vnni") and not _has("avx512bw"), "the target still has AVX-512"
rng = np.random.default_rng(0)
worst = 0.0
for qtype in sorted(set(cpu.RAW_INT8_TYPES) | set(cpu.PACKED_TYPES), key=int):
    w = random_blocks(qtype, 40 * 768 // get_format(qtype).block_size, rng).reshape(40, -1)
    ref_w = dequantize(w, qtype, (40, 768)).astype(np.float64)
    x = rng.standard_normal((2, 768)).astype(np.float32)
    g = x.astype(np.float64).reshape(2, -1, 32)
    d = np.abs(g).max(axis=-1, keepdims=True) / 127
    want = (np.rint(g / d) * d).reshape(2, 768) @ ref_w.T  # x rounded to 8 bits per group of 32, in float64
    routes = []
    if qtype in cpu.RAW_INT8_TYPES:
        routes.append(cpu.gemv_int8(x, w, qtype))
    if qtype in cpu.PACKED_TYPES:
        routes.append(cpu.gemv_packed(x, cpu.repack(w, qtype, activations="int8")))
    for got in routes:
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
print(worst)
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the AVX2 target is an x86-64 one")
def test_int8_kernels_without_avx512_compute_the_same_sums(tmp_path: Path) -> None:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), NUMBA_CPU_NAME="x86-64-v3",
               NUMBA_CPU_FEATURES="+avx,+avx2,+fma,+f16c,+sse4.2,+popcnt,+bmi,+bmi2")
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.split()[-1]) < 1e-5
