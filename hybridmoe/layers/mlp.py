import torch
import torch.nn.functional as F
from torch import nn

from .quant_linear import QuantSwiGLU


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.fused: QuantSwiGLU | None = None  # set by fuse()

    def fuse(self) -> bool:
        """Quantized layers with 8-bit activations: decode rows take one kernel call for all three. False if they
        are not such layers."""
        self.fused = QuantSwiGLU.of(self.gate, self.up, self.down)
        return self.fused is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fused(x) if self.fused is not None else None
        if y is not None:
            return y
        return self.down(F.silu(self.gate(x)) * self.up(x))
