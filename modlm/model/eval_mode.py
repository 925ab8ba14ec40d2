"""``eval_mode(model)``: run a block with the model in eval mode, then put its mode back.

Evaluation, calibration and decoding borrow a model that may be mid-training; they must leave it
in the mode they found it in, even when they raise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["eval_mode"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for the block; afterwards ``model.train(mode it had)``, exception or not.

    NOTE: ``nn.Module.train(mode)`` sets every submodule alike, so a model whose submodules were
    in mixed modes comes back uniformly in the top module's mode (none of ours mixes them).
    """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
