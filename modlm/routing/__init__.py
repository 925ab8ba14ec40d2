"""Routing: dispatch ops, the router protocol, the one registry, and the routers.

- ``ops``: capacity, top-k selection, gather and weighted scatter (pure functions).
- ``registry``: router name -> ``RouterSpec`` (no torch import; config, CLI and FLOPs read it).
- ``base``: the ``Router`` protocol, ``RouterOutput`` and ``build_router``.
- ``expert_choice`` (learned, the paper's), ``token_choice`` and ``stochastic`` (random): routers.

Imported lazily: config validation reads ``modlm.routing.registry`` without torch.
"""

__all__ = ["Router", "RouterOutput", "build_router"]


def __getattr__(name):
    if name in __all__:
        from modlm.routing import base

        return getattr(base, name)
    raise AttributeError(f"module 'modlm.routing' has no attribute {name!r}")
