"""Carry a GGUF file's 4-bit weights (Q4_0, Q4_1) into modlm's int4 layers without rounding again.

``modlm convert model.gguf OUT --keep-quant``: ``transformers`` reads the file and dequantizes
every tensor to float (``modlm.interop.llama``); rounding those floats to int4 again
(``modlm.quant.quantize_model``) would add a second rounding on top of the file's. Instead, each
linear layer whose source tensors are all Q4_0 or Q4_1 is rebuilt from the file's own 4-bit
values and block scales (``Int4Linear.from_int4``), read raw with ``gguf.GGUFReader``.

GGUF blocks hold 32 consecutive values along the input dimension K, as the int4 kernel's
groups do (``modlm.kernels.lowbit``: w = (q - 8) * scale + zero):

| type  | block (bytes)                           | w          | scale | zero     |
|-------|-----------------------------------------|------------|-------|----------|
| Q4_0  | d fp16, 16 bytes of q (18)              | d * (q - 8)| d     | 0        |
| Q4_1  | d fp16, m fp16, 16 bytes of q (20)      | d * q + m  | d     | m + 8 d  |

Byte j of a block holds value j in its low nibble and value j + 16 in its high one. q is kept
exactly; only the scale and zero are rounded, to bf16 (the kernel's): the weights differ from the
file's dequantized values by that rounding alone.

Names: GGUF tensor names map to Hugging Face ones by gguf's own table
(``gguf.get_tensor_name_map``, which ``transformers``' GGUF loader uses), then to modlm's by
``modlm.interop.llama.LLAMA_WEIGHTS``; fused layers (``attn.qkv``, ``mlp.gate_up``) stack the
parts' rows. llama.cpp stores q and k with each head's rotary pairs interleaved; as
``transformers`` does for the floats, their rows are put back in the rotate-half order. That is a
permutation of output rows N, and the blocks run along K, so it moves whole rows of q with their
scales.

Axis legend: N output rows, K input features, G groups (K / 32).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from modlm.config import ModelConfig
from modlm.interop.llama import LLAMA_WEIGHTS, convert_llama
from modlm.kernels import lowbit
from modlm.model.layers import Linear
from modlm.quant.linear import Int4Linear

__all__ = ["Q4_BLOCK_BYTES", "convert_gguf_int4", "keep_gguf_int4", "q4_blocks", "read_q4_linears"]

Q4_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}  # 32 values a block


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("keeping a GGUF file's 4-bit weights needs gguf: pip install 'modlm[gguf]'") from None
    return gguf


def q4_blocks(data: np.ndarray, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the raw blocks of one Q4_0 / Q4_1 tensor (``GGUFReader``'s ``data``: (N, bytes a row)
    uint8) into the int4 kernel's terms.

    Returns:
        q_NK: (N, K) uint8 in 0..15, the file's values as stored.
        scales_and_zeros_GN2: (K / 32, N, 2) fp32, [..., 0] the scale, [..., 1] the zero, so that
            the file's weight is (q - 8) * scale + zero (exactly, in fp32).
    """
    if kind not in Q4_BLOCK_BYTES:
        raise ValueError(f"tensor type {kind!r} is not a 4-bit block type ({', '.join(Q4_BLOCK_BYTES)})")
    size = Q4_BLOCK_BYTES[kind]
    N, row_bytes = data.shape
    if row_bytes % size:
        raise ValueError(f"a {kind} row of {row_bytes} bytes is not a whole number of {size}-byte blocks")
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(N, row_bytes // size, size)  # (N, G, bytes)
    d_NG = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q4_1":
        m_NG = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zero_NG = m_NG + 8 * d_NG  # d q + m = d (q - 8) + (m + 8 d); exact in fp32
    else:
        zero_NG = np.zeros_like(d_NG)
    qs = blocks[..., size - 16 :]  # (N, G, 16)
    q_NGk = np.concatenate([qs & 15, qs >> 4], axis=-1)  # values j, then j + 16
    q_NK = torch.from_numpy(q_NGk.reshape(N, -1).copy())
    sz_GN2 = torch.from_numpy(np.stack([d_NG, zero_NG], axis=-1)).transpose(0, 1).contiguous()
    return q_NK, sz_GN2


def _rope_rows(n_rows: int, n_heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation: row r of the Hugging Face weight is row
    ``_rope_rows(...)[r]`` of the file's (``transformers``' reverse permutation, on indices)."""
    return torch.arange(n_rows).reshape(n_heads, n_rows // n_heads // 2, 2).transpose(1, 2).reshape(n_rows)


def _linear_sources(config: ModelConfig, gguf) -> dict[str, list[tuple[str, int | None]]]:
    """{modlm linear module name: [(GGUF tensor name, heads to undo the rotary permutation by, or
    None), ...] in the order of the fused rows}, for every weight of ``LLAMA_WEIGHTS`` that is a
    linear layer's."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.n_layers)
    heads = {"self_attn.q_proj": config.n_heads, "self_attn.k_proj": config.n_kv_heads}
    out: dict[str, dict[int, tuple[str, int | None]]] = {}
    for hf, (target, part) in LLAMA_WEIGHTS.items():
        if not any(key in target for key in ("attn.qkv", "attn.proj", "mlp.gate_up", "mlp.down", "lm_head")):
            continue
        for i in range(config.n_layers) if "{i}" in hf else [None]:
            hf_i, target_i = (hf, target) if i is None else (hf.format(i=i), target.format(i=i))
            gguf_name = names.get_name(hf_i, try_suffixes=(".weight",))
            n_heads = next((h for key, h in heads.items() if key in hf), None)
            out.setdefault(target_i.removesuffix(".weight"), {})[part or 0] = (gguf_name, n_heads)
    return {name: [parts[k] for k in sorted(parts)] for name, parts in out.items()}


def read_q4_linears(path: str | Path, config: ModelConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{modlm linear module name: (q_NK, scales_and_zeros_GN2 fp32)} (``q4_blocks``) for every linear
    layer of ``config`` whose GGUF tensors at ``path`` are all Q4_0 / Q4_1, rows in modlm's order
    (fused parts stacked, q/k rows out of llama.cpp's rotary layout). Other layers are absent."""
    gguf = _gguf()
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    out = {}
    for module, parts in _linear_sources(config, gguf).items():
        if module == "lm_head" and config.tie_embeddings:
            continue  # the embedding is the head
        found = [tensors.get(name) for name, _ in parts]
        if not all(t is not None and t.tensor_type.name in Q4_BLOCK_BYTES for t in found):
            continue
        qs, szs = [], []
        for t, (_, n_heads) in zip(found, parts):
            q_NK, sz_GN2 = q4_blocks(t.data, t.tensor_type.name)
            if n_heads is not None:
                rows = _rope_rows(q_NK.shape[0], n_heads)
                q_NK, sz_GN2 = q_NK[rows], sz_GN2[:, rows]
            qs.append(q_NK)
            szs.append(sz_GN2)
        out[module] = (torch.cat(qs, dim=0), torch.cat(szs, dim=1))
    return out


@torch.no_grad()
def keep_gguf_int4(model: torch.nn.Module, path: str | Path) -> dict:
    """Replace, in place, each ``Linear`` of ``model`` (converted from the GGUF file ``path``) whose
    source tensors are Q4_0 / Q4_1 by an ``Int4Linear`` holding the file's own q, scales and zeros.
    The other layers stay as converted (fp32, the file's values dequantized).

    Returns {"int4": layers replaced, "fp32": [names of the linear layers left in fp32],
    "max_abs_diff": the largest |int4 weight - the file's dequantized weight| (the bf16 rounding
    of scale and zero), "max_abs_weight"}.
    A layer the int4 kernel cannot take (``lowbit.check_int4_shape``) stays fp32.
    Raises ValueError when a layer's shape in the file differs from the model's.
    """
    q4 = read_q4_linears(path, model.config)
    diff, peak, kept = 0.0, 0.0, 0
    for name, (q_NK, sz_GN2) in q4.items():
        old = model.get_submodule(name)
        if tuple(q_NK.shape) != (old.out_features, old.in_features):
            raise ValueError(
                f"{name}: the GGUF file's 4-bit weight is {tuple(q_NK.shape)}, the model's "
                f"{(old.out_features, old.in_features)}"
            )
        try:
            lowbit.check_int4_shape(*q_NK.shape)
        except ValueError:
            continue  # e.g. a head whose vocabulary is no multiple of 16: it stays fp32
        new = Int4Linear.from_int4(q_NK, sz_GN2.to(torch.bfloat16))
        file_w = lowbit.dequantize_int4(q_NK, sz_GN2)  # fp32 scale and zero: the file's own values
        diff = max(diff, (new.dequantize() - file_w).abs().max().item())
        peak = max(peak, file_w.abs().max().item())
        model.set_submodule(name, new)
        kept += 1
    rest = sorted(n for n, m in model.named_modules() if isinstance(m, Linear))
    return {"int4": kept, "fp32": rest, "max_abs_diff": diff, "max_abs_weight": peak}


def convert_gguf_int4(src: str | Path, out: str | Path, **kwargs: Any) -> tuple[Path, dict]:
    """``modlm.interop.llama.convert_llama`` of a GGUF file with its Q4_0 / Q4_1 linear layers kept
    in 4 bits (``keep_gguf_int4``); ``kwargs`` go to ``convert_llama``.

    Returns (the checkpoint, ``keep_gguf_int4``'s report). Raises ValueError for a source that is
    not a .gguf file.
    """
    if Path(src).suffix != ".gguf":
        raise ValueError(f"--keep-quant keeps a GGUF file's 4-bit weights, but {src} is not a .gguf file")
    report: dict = {}
    out = convert_llama(src, out, before_save=lambda model: report.update(keep_gguf_int4(model, src)), **kwargs)
    return out, report
