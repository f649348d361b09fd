"""RMSNorm of a few CPU rows in one call (kernels.cpu.rms_norm, through layers.norm.RMSNorm): torch's rms_norm to
float32 rounding, with and without a residual added in front."""
import pytest
import torch
import torch.nn.functional as F

from hybridmoe.kernels import cpu
from hybridmoe.layers.norm import RMSNorm


@pytest.mark.parametrize("shape", [(1, 1, 2048), (3, 64), (1, 2, 96)])
def test_kernel_norms_as_torch(shape) -> None:
    gen = torch.Generator().manual_seed(shape[-1])
    x, h = torch.randn(shape, generator=gen) * 3, torch.randn(shape, generator=gen)
    norm = RMSNorm(shape[-1], 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(shape[-1], generator=gen) + 0.5)
        want = F.rms_norm(x, norm.weight.shape, norm.weight, 1e-5)
        torch.testing.assert_close(norm(x), want, rtol=2e-6, atol=1e-6)
        total, normed = norm.add(x, h)
        assert torch.equal(total, x + h)
        torch.testing.assert_close(normed, F.rms_norm(x + h, norm.weight.shape, norm.weight, 1e-5), rtol=2e-6,
                                   atol=1e-6)
        _, alone = cpu.rms_norm(x, norm.weight, 1e-5)
        assert torch.equal(alone, norm(x))


def test_many_rows_and_strided_inputs_take_torch() -> None:
    norm = RMSNorm(64)
    x = torch.randn(8, 64)
    with torch.no_grad():
        assert torch.equal(norm(x), F.rms_norm(x, (64,), norm.weight, norm.eps))
        strided = torch.randn(2, 128)[:, ::2]
        assert torch.equal(norm(strided), F.rms_norm(strided, (64,), norm.weight, norm.eps))


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="residual"):
        cpu.rms_norm(torch.randn(1, 64), torch.ones(64), 1e-6, torch.randn(2, 64))
    with pytest.raises(ValueError, match="weight must be contiguous"):
        cpu.rms_norm(torch.randn(1, 64), torch.ones(32), 1e-6)
