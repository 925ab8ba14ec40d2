"""Routing: dispatch ops, the router protocol, and the routers.

- ``ops``: capacity, top-k selection, gather and weighted scatter (pure functions).
- ``base``: the ``Router`` protocol, ``RouterOutput`` and ``build_router``.
- the routers: ``expert_choice`` (learned, the paper's), ``token_choice``, ``stochastic``
  (random), ``attention_based`` (A-MoD) and ``tuned`` (router tuning of a pretrained model).

The registry of router names lives on the bottom floor (``modlm.spec.routers``, no torch), so
config validation, the CLI and FLOP accounting read it without importing this package.
"""

__all__ = ["Router", "RouterOutput", "build_router"]


def __getattr__(name):
    if name in __all__:
        from modlm.routing import base

        return getattr(base, name)
    raise AttributeError(f"module 'modlm.routing' has no attribute {name!r}")
