"""What a caller hands the model, checked once: token ids and targets.

A bad input is a one-line ``ValueError`` that names the argument and the offending value, never
an ``IndexError`` from deep inside the embedding, a shape error from the loss, or (worst) a
silently wrong loss: (B, T, 1) targets reshape to B·T numbers and would be accepted.

Cost, since ``MoDTransformer.forward`` runs this on every call, training steps included:

- type, dtype and shape checks read tensor metadata only: free, and static under torch.compile;
- the range check reads every id (one ``aminmax``, ~10 µs for a 8x512 batch). It runs on CPU
  tensors only. NOTE: on CUDA it would be a host sync per forward that stalls the training loop,
  so it is skipped there; out-of-range ids on CUDA still fail (the embedding and the loss kernels
  assert on the device: a CUDA error, not a silent result). It is skipped too while
  ``torch.compile`` traces (``torch.compiler.is_compiling()``): reading values breaks the graph.
"""

from __future__ import annotations

import torch

__all__ = ["ID_DTYPES", "IGNORE_INDEX", "check_inputs", "check_token_ids"]

# The dtypes nn.Embedding indexes with; targets must be torch.long (what cross_entropy takes).
ID_DTYPES = (torch.int64, torch.int32)
IGNORE_INDEX = -1  # a target of -1 is left out of the loss


def _range_checked(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values is cheap here (see the module docstring)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def check_token_ids(
    ids: torch.Tensor,
    vocab_size: int,
    name: str = "idx_BT",
    dims: tuple[int, ...] = (2,),
    dtypes: tuple[torch.dtype, ...] = ID_DTYPES,
    ignore_index: int | None = None,
    check_range: bool | None = None,
) -> None:
    """Raise a one-line ValueError unless ``ids`` is a non-empty integer tensor of ids in [0, vocab_size).

    Args:
        ids: the tensor to check; ``name`` is how the message calls it.
        dims: the numbers of dimensions allowed ((2,): (B, T)).
        dtypes: the dtypes allowed.
        ignore_index: one more value allowed besides [0, vocab_size) (targets: -1).
        check_range: read the values: None on CPU only and not while compiling (see the module
            docstring), True always (on CUDA a host sync: for calls off the hot path).
    """
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype not in dtypes:
        allowed = " or ".join(str(d) for d in dtypes) if len(dtypes) <= 2 else "any integer dtype"
        raise ValueError(f"{name} has dtype {ids.dtype}: token ids must be an integer tensor ({allowed})")
    if ids.dim() not in dims:
        want = " or ".join({1: "(T,)", 2: "(B, T)"}.get(d, f"{d}-D") for d in dims)
        hint = "; add the batch dimension with ids[None]" if ids.dim() == 1 and 2 in dims else ""
        raise ValueError(f"{name} has shape {tuple(ids.shape)}: token ids must be {want}{hint}")
    if ids.numel() == 0:
        raise ValueError(f"{name} has shape {tuple(ids.shape)}: give at least one token")
    if not (_range_checked(ids) if check_range is None else check_range):
        return
    lo, hi = (int(v) for v in ids.aminmax())
    if hi >= vocab_size:
        bad = hi
    elif lo < 0 and lo != ignore_index:  # lo == ignore_index: every value is >= it, so all fine
        bad = lo
    else:
        return
    note = f" ({ignore_index} marks an ignored position)" if ignore_index is not None else ""
    raise ValueError(f"{name} has token id {bad} outside the vocabulary [0, {vocab_size}){note}")


def check_inputs(vocab_size: int, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None) -> None:
    """The checks of ``MoDTransformer.forward``: ids (B, T) in [0, V); targets, if given, of the
    same shape, torch.long, in [0, V) or -1 (ignored)."""
    check_token_ids(idx_BT, vocab_size, "idx_BT")
    if targets_BT is None:
        return
    if isinstance(targets_BT, torch.Tensor) and targets_BT.shape != idx_BT.shape:
        raise ValueError(
            f"targets_BT has shape {tuple(targets_BT.shape)}: it must match idx_BT's {tuple(idx_BT.shape)}"
        )
    check_token_ids(targets_BT, vocab_size, "targets_BT", dtypes=(torch.int64,), ignore_index=IGNORE_INDEX)
