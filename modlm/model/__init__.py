"""The Mixture-of-Depths transformer: layers, attention, block kinds, the decoder."""

from modlm.model.transformer import ModelOutput, MoDTransformer

__all__ = ["ModelOutput", "MoDTransformer"]
