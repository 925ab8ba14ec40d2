"""Linear layers with low-bit weights, behind the contract of ``modlm.model.layers.Linear``.

Same ``forward(x)`` (input and output in x's dtype) and ``forward_rows(x, rows)`` (the product
with rows ``rows`` of the weight: one part of a fused projection), same ``in_features`` /
``out_features``. The weights are buffers, not parameters: these layers are for inference, and
nothing trains, decays or initialises them (``modlm.spec.roles`` covers parameters only).

| class         | ``weights`` | stored (checkpoint)                                        |
|---------------|-------------|------------------------------------------------------------|
| ``Bf16Linear``| "bf16"      | ``weight`` (N, K) bf16                                     |
| ``Int4Linear``| "int4"      | ``qweight`` (N, K/2) uint8, ``scales_and_zeros`` (K/g, N, 2) bf16 |

(+ ``bias`` in fp32 where the layer has one.)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from modlm.kernels import lowbit

__all__ = ["Bf16Linear", "Int4Linear", "QuantLinear"]


class QuantLinear(nn.Module):
    """Base of the low-bit linears: the shared shape attributes and the optional bias buffer."""

    weights: str = ""  # the format's name, as ``quantize_model`` and checkpoints record it

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    def record(self) -> dict:
        """What a checkpoint records to rebuild this layer empty (``modlm.quant.apply_formats``)."""
        return {"weights": self.weights, "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={self.weights}"


class Bf16Linear(QuantLinear):
    """A linear layer whose weight is stored in bf16; the product runs in bf16 (activations cast
    to bf16, the result cast back to the input's dtype)."""

    weights = "bf16"

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.bfloat16))

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Bf16Linear:
        """The bf16 copy of ``linear``'s weight (and its bias, kept in fp32)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.weight.copy_(linear.weight.detach())
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lowbit.bf16_linear(x, self.weight, self.bias)

    def forward_rows(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """x times rows ``rows`` of the weight (a view: no copy)."""
        return lowbit.bf16_linear(x, self.weight[rows], None if self.bias is None else self.bias[rows])

    def dequantize(self) -> torch.Tensor:
        """The weight (N, K) in fp32."""
        return self.weight.float()


class Int4Linear(QuantLinear):
    """A linear layer whose weight is 4 bits a value in groups of ``group_size`` along the input
    (``modlm.kernels.lowbit``: w = (q - 8) * scale + zero), multiplied by torch's CPU int4 kernel.

    In memory only the kernel's tiled copy of q is kept (0.5 byte a weight); ``state_dict``
    writes the plain layout (``qweight``) and loading tiles it again, so checkpoints do not
    depend on the torch build's private layout. CPU only: the tiled layout is the CPU kernel's.

    Raises ValueError at construction when the kernel cannot take the shape
    (``lowbit.check_int4_shape``); ``quantize_model`` keeps such layers in bf16 instead.
    """

    weights = "int4"

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, group_size: int = lowbit.INT4_GROUP_SIZE
    ):
        lowbit.check_int4_shape(out_features, in_features, group_size)
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size
        N, K = out_features, in_features
        # Placeholder of the tiled copy's shape; ``from_linear`` or loading fills it.
        self.register_buffer("packed", torch.zeros(N, K // 2, dtype=torch.uint8), persistent=False)
        self.register_buffer("scales_and_zeros", torch.zeros(K // group_size, N, 2, dtype=torch.bfloat16))

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group_size: int = lowbit.INT4_GROUP_SIZE) -> Int4Linear:
        """``linear``'s weight rounded to int4 (``lowbit.quantize_int4``); its bias kept in fp32."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, group_size=group_size)
        q_NK, sz_GN2 = lowbit.quantize_int4(linear.weight.detach().cpu(), group_size)
        new.packed = lowbit.pack_int4(q_NK)
        new.scales_and_zeros.copy_(sz_GN2)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach())
        return new

    @classmethod
    @torch.no_grad()
    def from_int4(cls, q_NK: torch.Tensor, scales_and_zeros_GN2: torch.Tensor) -> Int4Linear:
        """The layer of given 4-bit values q (N, K) uint8 in 0..15 and their scales and zeros
        (K/g, N, 2) (cast to bf16): weights already on a 4-bit grid (a GGUF file's Q4_0 / Q4_1
        blocks) are taken as they are, with no rounding of q. No bias."""
        N, K = q_NK.shape
        G = scales_and_zeros_GN2.shape[0]
        if G == 0 or K % G or tuple(scales_and_zeros_GN2.shape) != (G, N, 2):
            raise ValueError(
                f"scales_and_zeros of shape {tuple(scales_and_zeros_GN2.shape)} do not fit q of shape {(N, K)}: "
                "expected (K / group_size, N, 2)"
            )
        if q_NK.dtype != torch.uint8 or (q_NK.numel() and int(q_NK.max()) > 15):
            raise ValueError(f"q has dtype {q_NK.dtype} or values above 15: expected uint8 in 0..15")
        new = cls(K, N, bias=False, group_size=K // G)
        new.packed = lowbit.pack_int4(q_NK.cpu())
        new.scales_and_zeros.copy_(scales_and_zeros_GN2)
        return new

    def record(self) -> dict:
        return {**super().record(), "group_size": self.group_size}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed.device.type != "cpu":
            raise ValueError(f"int4 weights run on the CPU kernel only; this layer is on {self.packed.device}")
        return lowbit.int4_linear(x, self.packed, self.scales_and_zeros, self.group_size, self.bias)

    def forward_rows(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """x times rows ``rows`` of the weight.

        NOTE: computes every row and keeps ``rows``: the tiled layout cannot be sliced by row
        in general, and the one caller (``KeysKeptAttention``'s split of the fused qkv) wastes
        at most the other part of one projection.
        """
        return self(x)[..., rows]

    def qweight(self) -> torch.Tensor:
        """q in the plain layout: (N, K/2) uint8, two values a byte, the even k in the low nibble."""
        q_NK = lowbit.unpack_int4(self.packed, self.out_features, self.in_features)
        return q_NK[:, 0::2] | (q_NK[:, 1::2] << 4)

    def dequantize(self) -> torch.Tensor:
        """The weight (N, K) in fp32 that the kernel multiplies by."""
        q_NK = lowbit.unpack_int4(self.packed, self.out_features, self.in_features)
        return lowbit.dequantize_int4(q_NK, self.scales_and_zeros)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"

    # The checkpoint holds the plain layout; memory holds only the kernel's.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "qweight"] = self.qweight()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "qweight"
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if key not in state_dict:
            missing_keys.append(key)
            return
        qw = state_dict[key]
        want = (self.out_features, self.in_features // 2)
        if tuple(qw.shape) != want or qw.dtype != torch.uint8:
            error_msgs.append(f"size mismatch for {key}: {tuple(qw.shape)} {qw.dtype}, expected {want} torch.uint8")
            return
        q_NK = torch.stack([qw & 15, qw >> 4], dim=-1).reshape(self.out_features, self.in_features)
        self.packed = lowbit.pack_int4(q_NK.cpu())
