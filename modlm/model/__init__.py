"""The Mixture-of-Depths transformer: layers, attention, the block kinds, the decoder.

Imported lazily: ``modlm.spec.kinds`` (the block registry, no torch) is read by config
validation, which must not pull in torch.
"""

__all__ = ["ModelOutput", "MoDTransformer"]


def __getattr__(name):
    if name in __all__:
        from modlm.model import transformer

        return getattr(transformer, name)
    raise AttributeError(f"module 'modlm.model' has no attribute {name!r}")
