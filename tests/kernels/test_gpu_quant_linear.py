"""GpuQuantLinear (a GGUF weight's blocks on the GPU) against the numpy dequantization and a plain matrix product,
at decode sizes (the GEMV kernel) and prefill sizes (dequantized for one product). On a machine without CUDA,
Triton's interpreter runs the kernels on CPU tensors."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

pytest.importorskip("triton")

from hybridmoe import kernels  # noqa: E402
from hybridmoe.layers import gpu_quant_linear  # noqa: E402
from hybridmoe.layers.gpu_quant_linear import GpuQuantLinear  # noqa: E402
from hybridmoe.quant import dequantize, get_format, random_blocks  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def kernels_on_cpu_tensors(monkeypatch):
    monkeypatch.setattr(kernels, "ALSO_ON_CPU", True)


def layer(qtype: T, rows: int, cols: int, rng, bias: bool = False):
    fmt = get_format(qtype)
    raw = random_blocks(qtype, rows * cols // fmt.block_size, rng).reshape(rows, -1)
    w = torch.from_numpy(dequantize(raw, qtype, (rows, cols))).double()
    b = torch.from_numpy(rng.standard_normal(rows).astype(np.float32)) if bias else None
    return GpuQuantLinear(torch.from_numpy(raw).to(DEVICE), qtype, rows, cols, b), w, b


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_K, T.Q6_K], ids=lambda q: q.name)
@pytest.mark.parametrize("tokens", [1, 12])  # the GEMV kernel; dequantized for a matrix product
def test_matches_the_dequantized_product(qtype, tokens):
    from hybridmoe.kernels.gpu import MAX_TOKENS
    assert gpu_quant_linear.MAX_TOKENS == MAX_TOKENS
    rng = np.random.default_rng(tokens)
    lin, w, b = layer(qtype, 64, 256, rng, bias=True)
    x = torch.from_numpy(rng.standard_normal((1, tokens, 256)).astype(np.float32))
    want = x.double() @ w.T + b.double()
    got = lin(x.to(DEVICE)).cpu()
    assert got.shape == (1, tokens, 64) and got.dtype == torch.float32
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-4


def test_stacked_layers_give_each_layers_output():
    rng = np.random.default_rng(3)
    parts = [layer(T.Q8_0, rows, 256, rng) for rows in (64, 32, 32)]
    stacked = GpuQuantLinear.stack([p[0] for p in parts])
    assert stacked.out_features == 128
    x = torch.from_numpy(rng.standard_normal((2, 256)).astype(np.float32)).to(DEVICE)
    want = torch.cat([p[0](x) for p in parts], dim=-1)
    assert torch.allclose(stacked(x), want, rtol=1e-5, atol=1e-5)
    assert GpuQuantLinear.stack([parts[0][0], layer(T.Q4_K, 32, 256, rng)[0]]) is None  # types differ
