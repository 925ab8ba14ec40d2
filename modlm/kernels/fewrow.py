"""Few-row fp32 linear layers for decoding on CPUs.

Decoding multiplies a few rows (one new token per sequence; in a routed block, only the rows
routed in) by every weight matrix: a memory-bound read of the weights. torch's CPU ``mm`` is
tuned for large products; for 2-16 rows it spent 1.5-2x the time of a one-row
matrix-vector product on the AVX2 CPU of our figures (benchmarks/README.md), which taxes exactly
what MoD saves at batch size > 1. ``linear`` sends such products to a small native kernel
(``modlm/kernels/csrc/fewrow.c``, built at install where a C compiler is present) that streams each
weight matrix once, and everything else to ``F.linear``.

The kernel is used only where it computes what ``F.linear`` computes, in fp32 without
gradients: CPU tensors, fp32 input and weight (no autocast), at most ``MAX_ROWS`` rows, not
while compiling. Results match ``F.linear`` to fp32 rounding (the summation order differs).
``set_enabled(False)`` or the environment variable ``MODLM_KERNELS=0`` turns it off.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:  # built by setup.py where possible; optional by design
    from modlm.kernels import _fewrow
except ImportError:  # pragma: no cover - depends on the install
    _fewrow = None

# Up to this many rows the kernel beats torch's mm here (measured crossover is above 32 rows
# at one thread; 16 covers batch-16 decoding, where dense blocks run 16 rows).
MAX_ROWS = 16

_AVAILABLE = bool(_fewrow is not None and _fewrow.available())
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)
_enabled = os.environ.get("MODLM_KERNELS", "1") != "0"


def available() -> bool:
    """True if the native kernel is built and this CPU can run it (x86-64 with AVX2 and FMA)."""
    return _AVAILABLE


def enabled() -> bool:
    """True if ``linear`` will use the native kernel where it applies."""
    return _AVAILABLE and _enabled


def set_enabled(flag: bool) -> bool:
    """Turn the native kernel on or off (for A/B timing); returns the previous setting."""
    global _enabled
    prev, _enabled = _enabled, bool(flag)
    return prev


def describe() -> str:
    """One line for benchmark headers: which kernel few-row products use, and why."""
    if enabled():
        return f"native few-row kernel (AVX2/FMA, up to {MAX_ROWS} rows, fp32 CPU, no grad), torch elsewhere"
    if not _enabled:
        return "torch (native kernel turned off)"
    if _fewrow is None:
        return "torch (native kernel not built)"
    return "torch (this CPU lacks AVX2/FMA)"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the few-row kernel where it applies."""
    if not _enabled or not _AVAILABLE or not _applies(x, weight, bias):
        return F.linear(x, weight, bias)
    N, K = weight.shape
    x_MK = x.reshape(-1, K).contiguous()
    M = x_MK.shape[0]
    y_MN = torch.empty(M, N, dtype=x.dtype)
    _fewrow.sgemm_nt(x_MK.data_ptr(), weight.data_ptr(), y_MN.data_ptr(), M, N, K, torch.get_num_threads())
    if bias is not None:
        y_MN += bias
    return y_MN.view(*x.shape[:-1], N)


def _applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"):
        return False
    if weight.dim() != 2 or not weight.is_contiguous() or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False  # training: autograd needs F.linear
    if torch.is_autocast_enabled("cpu") or _is_compiling():
        return False  # autocast would compute in bf16; compiled graphs cannot take raw pointers
    rows = x.numel() // max(1, x.shape[-1])
    return 0 < rows <= MAX_ROWS
