"""The one-launch RMSNorm agrees with the eager RMSNorm (normalise in float32, cast, scale): the same arithmetic
but the order of the sum of squares, so at most one unit of the last place apart, and almost always equal."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest  # noqa: E402

pytest.importorskip("triton")

from hybridmoe.kernels.gpu.norm import add_rms_norm, rms_norm  # noqa: E402
from hybridmoe.layers.norm import RMSNorm  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def eager(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Units of the last place between same-sign neighbours, through the integer view of the bits."""
    ints = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[a.dtype]
    return (a.view(ints).long() - b.view(ints).long()).abs()


@pytest.mark.parametrize("shape,x_dtype,w_dtype", [
    ((3, 7168), torch.bfloat16, torch.bfloat16),  # a DeepSeek-V3 hidden state
    ((1, 32, 128), torch.bfloat16, torch.bfloat16),  # Qwen3's per-head q norm
    ((5, 1536), torch.float16, torch.float16),
    ((2, 100), torch.bfloat16, torch.float32),  # not a power of two; the weight promotes the output to float32
])
def test_matches_the_eager_norm(shape, x_dtype, w_dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(x_dtype).to(DEVICE)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(w_dtype).to(DEVICE)
    got, want = rms_norm(x, w, 1e-6), eager(x, w, 1e-6)
    assert got.dtype == want.dtype and got.shape == want.shape
    apart = ulps_apart(got, want)
    assert apart.max() <= 1 and (apart > 0).float().mean() < 0.01
    if not torch.cuda.is_available() and w_dtype != torch.float32:
        # through the module: CPU tensors take the eager path, so this is the same comparison
        norm = RMSNorm(shape[-1], 1e-6).to(w_dtype)
        norm.weight.data.copy_(w)
        assert torch.equal(norm(x), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_residual_add_then_norm(dtype) -> None:
    """(x + residual, its norm) in one launch: the sum rounded as torch's add rounds it, then the same norm."""
    g = torch.Generator().manual_seed(3)
    x, res = ((torch.randn(3, 2048, generator=g) * 2).to(dtype).to(DEVICE) for _ in range(2))
    w = (1 + 0.1 * torch.randn(2048, generator=g)).to(dtype).to(DEVICE)
    total, normed = add_rms_norm(x, res, w, 1e-6)
    assert torch.equal(total.cpu(), (x + res).cpu())
    apart = ulps_apart(normed, eager(x + res, w, 1e-6))
    assert apart.max() <= 1 and (apart > 0).float().mean() < 0.01
    with pytest.raises(ValueError, match="residual must be"):
        add_rms_norm(x, res.float(), w, 1e-6)


def test_non_contiguous_rows() -> None:
    x = torch.randn(4, 256, dtype=torch.bfloat16, device=DEVICE)[:, ::2]
    w = torch.ones(128, dtype=torch.bfloat16, device=DEVICE)
    assert ulps_apart(rms_norm(x, w, 1e-5), eager(x, w, 1e-5)).max() <= 1


def test_bad_inputs_name_the_problem() -> None:
    x = torch.ones(2, 64, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight must have shape \(64,\)"):
        rms_norm(x, torch.ones(32, dtype=torch.bfloat16, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="must be float32, bfloat16 or float16"):
        rms_norm(x.to(torch.int32), torch.ones(64, device=DEVICE), 1e-6)
