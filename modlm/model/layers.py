"""Building blocks of the decoder: linear layers, RMSNorm, rotary positions, the SwiGLU MLP.

Axis legend: B batch, T sequence length, D model width, H query heads, E head size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from modlm.config import ModelConfig
from modlm.kernels import fewrow as kernels
from modlm.spec import roles


class Linear(nn.Linear):
    """``nn.Linear`` whose few-row fp32 products without gradients (decoding on a CPU) go to
    ``modlm.kernels.fewrow``; training and everything else is ``F.linear``. Same parameters and names.

    The contract every layer in its place keeps (``modlm.quant`` swaps in low-bit ones):
    ``forward(x)`` and ``forward_rows(x, rows)``; callers never read ``.weight`` themselves.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)

    def forward_rows(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """x times rows ``rows`` of the weight: one part of a fused projection (a view, no copy)."""
        return kernels.linear(x, self.weight[rows], None if self.bias is None else self.bias[rows])


class RMSNorm(nn.Module):
    param_roles = {"weight": roles.NORM}

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: under bf16 autocast the mean of squares loses too many bits.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Rotary(nn.Module):
    """Rotary position tables. Positions are explicit, so routed tokens keep their true positions."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        t = torch.arange(max_seq_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (T_max, E/2)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin at positions ``pos`` of shape (T,) or (B, T) -> (..., T, E/2)."""
        return self.cos[pos], self.sin[pos]


def apply_rotary(x_BHTE: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dim. cos/sin: (T, E/2) or (B, T, E/2)."""
    if cos.dim() == 3:  # per-row positions (routed tokens): broadcast over heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x_BHTE.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x_BHTE.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    param_roles = {"gate_up.weight": roles.MATRIX, "down.weight": roles.OUT_MATRIX}

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up = Linear(config.d_model, 2 * config.d_mlp, bias=False)
        self.down = Linear(config.d_mlp, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)
