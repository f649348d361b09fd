"""RMSNorm, with a residual add in front of it when the caller has one (decode fuses the two on the CPU)."""
import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu as ck
from ..kernels import gpu_kernel_for
from .rope import apply_rope

CPU_KERNEL_ROWS = 4  # up to this many float32 rows on the CPU, one kernel call (kernels.cpu.rms_norm)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def _kernel_applies(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32
                and x.numel() <= CPU_KERNEL_ROWS * x.shape[-1] and x.is_contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel_applies(x):
            return ck.rms_norm(x, self.weight, self.eps)[1]
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # one fused op (decode runs dozens)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        fused = gpu_kernel_for(x, "norm", "rms_norm")
        out = fused(x, self.weight, self.eps) if fused is not None else None  # one launch instead of eight
        if out is not None:
            return out
        # Normalise in f32 and scale after casting back, as the reference implementations do.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def then_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
        """apply_rope of this norm's output (x [B, T, H, D]: per-head norms, as Qwen3's q_norm and k_norm); one
        launch on the GPU where the weight has x's dtype."""
        fused = gpu_kernel_for(x, "rope", "norm_rope") if self.weight.dtype == x.dtype else None
        out = (fused(x, self.weight, self.eps, cos, sin, interleaved)
               if fused is not None and x.stride(-1) == 1 else None)
        return out if out is not None else apply_rope(self(x), cos, sin, interleaved)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, its norm): one kernel call at CPU decode."""
        if (self._kernel_applies(x) and residual.dtype == x.dtype and residual.device == x.device
                and residual.is_contiguous()):
            return ck.rms_norm(x, self.weight, self.eps, residual)
        fused = gpu_kernel_for(x, "norm", "add_rms_norm")
        if (fused is not None and not (x.dtype == self.weight.dtype == torch.float32)
                and residual.shape == x.shape and residual.dtype == x.dtype and residual.device == x.device):
            out = fused(x, residual, self.weight, self.eps)  # one launch instead of two
            if out is not None:
                return out
        x = x + residual
        return x, self(x)
