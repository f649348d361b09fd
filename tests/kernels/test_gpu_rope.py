"""Rotary embedding in one launch agrees with the eager `apply_rope` (same roundings, so within one unit of the
last place, and almost always equal), for half-split and interleaved pairs and strided inputs."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest  # noqa: E402

pytest.importorskip("triton")

from hybridmoe.kernels.gpu.rope import norm_rope, rope  # noqa: E402
from hybridmoe.layers.norm import RMSNorm  # noqa: E402
from hybridmoe.layers.rope import Rope, RopeTables, apply_rope  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ints = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[a.dtype]
    return (a.view(ints).long() - b.view(ints).long()).abs()


def tables(batch: int, tokens: int, dim: int):
    positions = torch.arange(batch * tokens).view(batch, tokens) * 7 + 3
    return RopeTables(Rope(dim=dim, theta=10000.0)).cos_sin(positions)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 32, 128), (2, 5, 3, 64), (1, 3, 1, 64)])  # decode q; prefill; MLA key
def test_matches_the_eager_rope(shape, dtype, interleaved) -> None:
    B, T, H, D = shape
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(H + T)) * 4).to(dtype)
    cos, sin = tables(B, T, D)
    want = apply_rope(x, cos, sin, interleaved)  # CPU tensors: the eager path
    got = rope(x.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE), interleaved).cpu()
    assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
    if dtype == torch.float32:  # a multiply-add may be fused on one side: float32 rounding where terms cancel
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(x.abs().max()))
        return
    apart = ulps_apart(got, want)
    assert apart.max() <= 1 and (apart > 0).float().mean() < 0.02


def test_strided_queries_from_a_stacked_projection() -> None:
    """q as a view into a [B, T, q + k + v] projection output: rows are not contiguous."""
    qkv = torch.randn(1, 4, 8 * 64 + 2 * 2 * 64, dtype=torch.bfloat16)
    q = qkv[..., :8 * 64].view(1, 4, 8, 64)
    cos, sin = tables(1, 4, 64)
    got = rope(q.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE), False).cpu()
    assert ulps_apart(got, apply_rope(q, cos, sin, False)).max() <= 1


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 32, 128), (1, 1, 4, 128), (2, 5, 3, 64)])  # decode q, k; prefill
def test_norm_then_rope_matches_the_eager_pair(shape, dtype, interleaved) -> None:
    """Qwen3's per-head q_norm / k_norm and the rotation after it, in one launch, from a stacked projection's view."""
    B, T, H, D = shape
    g = torch.Generator().manual_seed(H * 7 + T)
    qkv = (torch.randn(B, T, (H + 2) * D, generator=g) * 3).to(dtype)
    x = qkv[..., :H * D].view(B, T, H, D)  # strided rows, as attention takes them
    norm = RMSNorm(D, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(D, generator=g) + 0.5)
    norm = norm.to(dtype)
    cos, sin = tables(B, T, D)
    with torch.no_grad():
        want = apply_rope(norm(x), cos, sin, interleaved)  # CPU tensors: the eager pair
        got = norm_rope(x.to(DEVICE), norm.weight.to(DEVICE), norm.eps, cos.to(DEVICE), sin.to(DEVICE),
                        interleaved).cpu()
    assert got.dtype == want.dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        return
    apart = ulps_apart(got, want)
    assert apart.max() <= 2 and (apart > 0).float().mean() < 0.03


def test_norm_rope_takes_a_weight_of_the_activations_dtype() -> None:
    x = torch.zeros(1, 1, 2, 64, dtype=torch.bfloat16, device=DEVICE)
    cos, sin = (t.to(DEVICE) for t in tables(1, 1, 64))
    with pytest.raises(ValueError, match="weight must be torch.bfloat16"):
        norm_rope(x, torch.ones(64, device=DEVICE), 1e-6, cos, sin, False)


def test_bad_inputs_name_the_problem() -> None:
    x = torch.zeros(1, 1, 2, 64, device=DEVICE)
    cos, sin = (t.to(DEVICE) for t in tables(1, 1, 64))
    with pytest.raises(ValueError, match="even head_dim"):
        rope(torch.zeros(1, 1, 2, 63, device=DEVICE), cos, sin, False)
    with pytest.raises(ValueError, match=r"cos must be \[batch, tokens, 32\]"):
        rope(x, cos[..., :16], sin, False)
