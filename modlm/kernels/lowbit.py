"""Weight-only low-bit matrix products on CPUs: bf16 weights, and 4-bit weights in groups.

Decoding reads every weight once per token, so its speed is bound by the bytes read: bf16 halves
them, 4-bit quarters them again. Activations stay in the model's dtype outside these products.

int4 (asymmetric, groups of ``group_size`` along the input dimension K): each output row n and
group g has a scale s and a zero z (bf16), and the weight is ``w = (q - 8) * s + z`` with q an
integer in 0..15. The product runs in torch's own CPU kernel
(``aten._weight_int4pack_mm_for_cpu``, bf16 activations: with fp32 activations the same kernel
is ~25x slower, so they are cast), which takes the weight in a tiled layout of its own
(``aten._convert_weight_to_int4pack_for_cpu``). That layout is private to the torch build, so
what is stored is the plain layout (``qweight``: (N, K/2) uint8, two values a byte, the even k
in the low nibble) and the tiled one is derived from it when loading.

Kernel constraints (torch 2.13): N a multiple of 16, K a multiple of ``group_size`` (a multiple
of 32), 2-D bf16 activations; ``check_int4_shape`` names a violation.

Axis legend: M rows of activations, K input features, N output features, G groups (K / group_size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "INT4_GROUP_SIZE",
    "bf16_linear",
    "check_int4_shape",
    "dequantize_int4",
    "int4_linear",
    "pack_int4",
    "quantize_int4",
    "unpack_int4",
]

INT4_GROUP_SIZE = 32
_N_MULTIPLE = 16  # the CPU packing works on blocks of 16 output rows


def check_int4_shape(out_features: int, in_features: int, group_size: int = INT4_GROUP_SIZE) -> None:
    """Raise ValueError (one line, naming the value) when the int4 CPU kernel cannot take an
    (out_features, in_features) weight in groups of ``group_size``."""
    if group_size <= 0 or group_size % 32:
        raise ValueError(f"group_size={group_size} is invalid: the int4 kernel takes multiples of 32")
    if in_features % group_size:
        raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size} (int4 groups)")
    if out_features % _N_MULTIPLE:
        raise ValueError(
            f"out_features={out_features} is not a multiple of {_N_MULTIPLE} (the int4 CPU kernel's blocks)"
        )


@torch.no_grad()
def quantize_int4(w_NK: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Round a weight to 4 bits per value, asymmetric min/max per group of ``group_size`` along K.

    Returns:
        q_NK: (N, K) uint8 in 0..15.
        scales_and_zeros_GN2: (K / group_size, N, 2) bf16, [..., 0] the scale, [..., 1] the zero,
            so that w ≈ (q - 8) * scale + zero. q is rounded against the bf16-rounded scale and
            zero, the values the kernel multiplies by.
    """
    N, K = w_NK.shape
    check_int4_shape(N, K, group_size)
    w_NGk = w_NK.detach().float().reshape(N, K // group_size, group_size)
    lo, hi = w_NGk.amin(-1), w_NGk.amax(-1)  # (N, G)
    # A constant group has max == min: any positive scale represents it (q = 8 everywhere).
    scale = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)
    q = ((w_NGk - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1) + 8).round().clamp(0, 15)
    sz_GN2 = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
    return q.to(torch.uint8).reshape(N, K), sz_GN2


def dequantize_int4(q_NK: torch.Tensor, scales_and_zeros_GN2: torch.Tensor) -> torch.Tensor:
    """The fp32 weight (N, K) that ``q`` and its scales and zeros stand for: (q - 8) * s + z."""
    N, K = q_NK.shape
    group_size = K // scales_and_zeros_GN2.shape[0]
    sz_NG2 = scales_and_zeros_GN2.float().transpose(0, 1)
    scale_NK = sz_NG2[..., 0].repeat_interleave(group_size, dim=1)
    zero_NK = sz_NG2[..., 1].repeat_interleave(group_size, dim=1)
    return (q_NK.float() - 8) * scale_NK + zero_NK


def pack_int4(q_NK: torch.Tensor) -> torch.Tensor:
    """The kernel's tiled layout of q (N, K) uint8 in 0..15 (a CPU tensor of torch's own layout)."""
    check_int4_shape(*q_NK.shape)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q_NK.to(torch.int32).contiguous(), 2)


def unpack_int4(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Invert ``pack_int4``: q (N, K) uint8, read back through the kernel itself.

    The identity times the weight with every scale 1 and zero 0 is (q - 8)ᵀ, small integers that
    bf16 holds exactly, so this is exact and depends on no knowledge of the tiled layout.
    """
    N, K = out_features, in_features
    eye_KK = torch.eye(K, dtype=torch.bfloat16)
    ones_GN2 = torch.zeros(K // 32, N, 2, dtype=torch.bfloat16)
    ones_GN2[..., 0] = 1
    qt_KN = torch.ops.aten._weight_int4pack_mm_for_cpu(eye_KK, packed, 32, ones_GN2)
    return (qt_KN.float() + 8).round().to(torch.uint8).t().contiguous()


def int4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_and_zeros_GN2: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (..., K) times the int4 weight (N, K) -> (..., N) in x's dtype (+ bias).

    The product takes bf16 activations and returns bf16 (rounding of both is the error budget
    beyond the weights' own); the result is cast back to x's dtype.
    """
    N = scales_and_zeros_GN2.shape[1]
    K = x.shape[-1]
    x_MK = x.reshape(-1, K).to(torch.bfloat16)
    if x_MK.shape[0] == 0:
        y_MN = x_MK.new_zeros(0, N)
    else:
        y_MN = torch.ops.aten._weight_int4pack_mm_for_cpu(x_MK.contiguous(), packed, group_size, scales_and_zeros_GN2)
    y = y_MN.to(x.dtype).view(*x.shape[:-1], N)
    return y if bias is None else y + bias.to(x.dtype)


def bf16_linear(x: torch.Tensor, weight_bf16: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) times a bf16 weight (N, K) -> (..., N) in x's dtype (+ bias): the activations
    are cast to bf16 for the product: 2.5x faster than widening the weight to fp32 for every
    product, and as fast as the fp32 few-row kernel, at half the weight memory (one thread,
    batch 1, SmolLM2-135M shapes on the 2-core AVX2 CPU of our figures)."""
    y = F.linear(x.to(torch.bfloat16), weight_bf16).to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)
