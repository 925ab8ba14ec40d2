"""modlm: Mixture-of-Depths language models in PyTorch.

    >>> import modlm
    >>> cfg = modlm.ModelConfig.from_name("tiny")
    >>> model = modlm.MoDTransformer(cfg)
"""

from modlm.config import ModelConfig, preset_names

__version__ = "0.1.0"

__all__ = ["ModelConfig", "MoDTransformer", "ModelOutput", "preset_names", "__version__"]


def __getattr__(name):
    # Import torch-heavy modules lazily so `modlm --help` and config validation stay fast.
    if name in ("MoDTransformer", "ModelOutput"):
        from modlm import model

        return getattr(model, name)
    raise AttributeError(f"module 'modlm' has no attribute {name!r}")
