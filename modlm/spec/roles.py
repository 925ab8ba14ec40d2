"""Parameter roles, declared by the modules that own the parameters.

Initialisation, weight decay, gradient clipping and freezing all need to know what a parameter
*is* (an embedding, a matrix writing into the residual stream, a router vector, ...). Reading
that off parameter names breaks silently as soon as a new module arrives (Hugging Face Llama
weights, MoE experts, router-only tuning). Instead each module class declares the roles of the
parameters it creates, by name relative to itself::

    class MLP(nn.Module):
        param_roles = {"gate_up.weight": MATRIX, "down.weight": OUT_MATRIX}

``parameter_roles(model)`` collects the declarations of every submodule (a deeper module's
declaration wins over an ancestor's) and refuses a model with any parameter left undeclared,
naming it. No torch import here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Role:
    """What a parameter is, as the training code needs to know it.

    decay: AdamW weight decay applies (matrices yes; vectors, norm gains and the token
        embedding no: decaying the embedding pulls rare tokens' rows to zero).
    init: how ``MoDTransformer.init_weights`` initialises it: "normal" (init_std),
        "scaled_normal" (init_std / sqrt(2 n_layers): writes into the residual stream),
        "ones", "router" (normal(0, 1/sqrt(d_model))), "zeros" or "module" (keep the owning
        module's own initialisation).
    clip_group: parameters clipped together; the causal predictors are clipped apart, since
        their loss never reaches the LM and a spike in it must not shrink the LM's step.
    routing: part of the routing machinery (routers, predictors): what router tuning trains
        while the rest of the model is frozen.
    """

    name: str
    decay: bool
    init: str
    clip_group: str = "lm"
    routing: bool = False

    def __repr__(self) -> str:
        return f"Role({self.name})"


EMBEDDING = Role("embedding", decay=False, init="normal")
LM_HEAD = Role("lm_head", decay=True, init="normal")
MATRIX = Role("matrix", decay=True, init="normal")
OUT_MATRIX = Role("out_matrix", decay=True, init="scaled_normal")
NORM = Role("norm", decay=False, init="ones")
BIAS = Role("bias", decay=False, init="zeros")
ROUTER = Role("router", decay=False, init="router", routing=True)
# A router added to a pretrained model: zero at init, so it starts with no preference (modlm adapt).
ROUTER_ZERO = Role("router_zero", decay=False, init="zeros", routing=True)
PREDICTOR_MATRIX = Role("predictor_matrix", decay=True, init="module", clip_group="predictor", routing=True)
PREDICTOR_VECTOR = Role("predictor_vector", decay=False, init="module", clip_group="predictor", routing=True)

ROLES: tuple[Role, ...] = (
    EMBEDDING,
    LM_HEAD,
    MATRIX,
    OUT_MATRIX,
    NORM,
    BIAS,
    ROUTER,
    ROUTER_ZERO,
    PREDICTOR_MATRIX,
    PREDICTOR_VECTOR,
)


def parameter_roles(model: Any) -> dict[str, Role]:
    """{parameter name: Role} for every parameter of ``model`` (names as ``named_parameters``).

    Raises ValueError naming the first parameter that no module declares: a new module must say
    what its parameters are before it can be trained.
    """
    declared: dict[str, Role] = {}
    for mod_name, module in model.named_modules():
        for rel, role in getattr(type(module), "param_roles", {}).items():
            declared[f"{mod_name}.{rel}" if mod_name else rel] = role
    roles: dict[str, Role] = {}
    for name, _ in model.named_parameters():
        if name not in declared:
            raise ValueError(
                f"parameter {name!r} has no declared role: its module must list it in param_roles "
                f"(see modlm.spec.roles)"
            )
        roles[name] = declared[name]
    return roles


def named_parameters_with_roles(model: Any) -> Iterator[tuple[str, Any, Role]]:
    """(name, parameter, role) for every parameter, in ``named_parameters`` order."""
    roles = parameter_roles(model)
    for name, p in model.named_parameters():
        yield name, p, roles[name]


def freeze_all_but(model: Any, keep: Iterable[Role] | None = None, routing: bool = False) -> int:
    """Set ``requires_grad`` from roles: True for roles in ``keep`` (or routing roles if
    ``routing``), False for the rest. Returns how many parameters stay trainable."""
    keep = set(keep or ())
    n = 0
    for _, p, role in named_parameters_with_roles(model):
        p.requires_grad_(role in keep or (routing and role.routing))
        n += int(p.requires_grad)
    return n
