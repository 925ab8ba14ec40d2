"""modlm: Mixture-of-Depths language models in PyTorch.

    >>> import modlm
    >>> cfg = modlm.ModelConfig.from_name("tiny")
    >>> model = modlm.MoDTransformer(cfg)

Package layout (one concern per folder):

- ``modlm.config``: ``ModelConfig`` and presets (no torch import).
- ``modlm.model``: layers, attention, the block kinds behind one contract, the transformer.
- ``modlm.routing``: dispatch ops, the router protocol and its registry, the routers.
- ``modlm.inference``: per-layer KV caches, decode policy, ``generate``, calibration, CPU kernel.
- ``modlm.training``: trainer, optimizer groups, distributed setup, checkpoints, data, tokenizers.
- ``modlm.experiments``: isoFLOP sweeps and ``modlm reproduce``.
- ``modlm.interop``: Hugging Face Llama conversion and the Auto-class wrapper (``modlm.hf``).
- ``modlm.flops``, ``modlm.cli``, ``modlm.bench``.
"""

from modlm.config import ModelConfig, preset_names

__version__ = "0.1.0"

__all__ = [
    "ModelConfig",
    "MoDTransformer",
    "ModelOutput",
    "apply_chat_template",
    "generate",
    "load_model",
    "preset_names",
    "__version__",
]

# torch-heavy names are imported on first use, so `modlm --help` and config validation stay fast.
_LAZY = {
    "MoDTransformer": "modlm.model",
    "ModelOutput": "modlm.model",
    "apply_chat_template": "modlm.training.chat",
    "generate": "modlm.inference.generate",
    "load_model": "modlm.training.checkpoint",
}


# Submodules reachable as ``modlm.X`` without importing them first (``modlm.hf`` needs transformers).
_LAZY_MODULES = ("hf",)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _LAZY_MODULES:
        import importlib

        return importlib.import_module(f"modlm.{name}")
    raise AttributeError(f"module 'modlm' has no attribute {name!r}")
