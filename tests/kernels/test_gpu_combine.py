"""The routed experts' weighted sum in one launch agrees with the eager `layers.moe.combine` to float32 summation
order, then one rounding to the output dtype."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest  # noqa: E402

pytest.importorskip("triton")

from hybridmoe.kernels.gpu.combine import combine as fused  # noqa: E402
from hybridmoe.layers.moe import combine  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("N,K,D", [(1, 8, 7168), (3, 6, 2048), (2, 2, 100)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_the_eager_combine(N, K, D, dtype) -> None:
    g = torch.Generator().manual_seed(N * K)
    parts = torch.randn(K, N, D, generator=g).to(dtype).transpose(0, 1)  # [N, K, D] as decode makes it
    weights = torch.rand(N, K, generator=g)
    want = combine(parts, weights, dtype)  # CPU tensors: the eager path
    got = fused(parts.to(DEVICE), weights.to(DEVICE), dtype).cpu()
    assert got.dtype == dtype and got.shape == (N, D)
    tol = 1e-6 if dtype == torch.float32 else 8e-3  # float32 summation order; one bfloat16 rounding
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_mismatched_weights_are_refused() -> None:
    with pytest.raises(ValueError, match=r"parts must be \[N, K, D\]"):
        fused(torch.zeros(1, 4, 8, device=DEVICE), torch.zeros(1, 3, device=DEVICE), torch.float32)
