"""The one registry of routers: name -> ``RouterSpec``. No torch import.

Config validation (``ModelConfig.router``), the CLI's ``--router`` choices and FLOP accounting
all read this table, and ``build_router`` builds from it, so a new router is one module plus one
``register_router`` call here: nothing else names routers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modlm.spec.registry import Registry, load_target

# ``ModelConfig.router`` value meaning "no router": every block is dense.
NO_ROUTER = "none"

# How routed blocks route a sequence: one idea, one name ("routing") and these values wherever it
# is chosen (``MoDTransformer.forward``, ``Router.forward``, ``generate``'s ``prefill_routing``,
# the Hugging Face wrapper, the CLI). "topk": expert-choice over each known sequence (training,
# scoring a known text; non-causal). "causal": each token decides from its own state, as decoding
# must (Raposo et al. 2024, section 3.5).
ROUTINGS = ("topk", "causal")


def check_routing(value: str, name: str = "routing") -> str:
    """``value`` if it is one of ``ROUTINGS``, else a one-line ValueError naming ``name`` and it."""
    if value not in ROUTINGS:
        raise ValueError(f"{name}={value!r} is invalid: must be one of {ROUTINGS}")
    return value


@dataclass(frozen=True)
class RouterSpec:
    """What the rest of the library needs to know about a router without building it.

    name: the ``ModelConfig.router`` value.
    target: "module:Class" of the implementation (imported on first build).
    summary: one line for ``--help``.
    scores_tokens: the router computes a learned score r = w·x for every token (a D-vector of
        parameters, 2·T·D forward FLOPs per routed block).
    thresholded: its causal decision thresholds a logit (``router.threshold``), so calibration
        can move it (the inference-time compute knob).
    predictor: ``predictor(config)`` is True when the router carries a causal predictor MLP
        (``config.predictor_hidden`` units; its FLOPs and parameters are counted).
    aux_loss: ``aux_loss(config)`` is True when the router trains an auxiliary BCE on its logit.
    needs_received_attention: top-k routing scores tokens by the attention they receive in the
        previous block (A-MoD): the model asks that block to record it, and FLOP accounting
        counts the recomputed attention probabilities.
    """

    name: str
    target: str
    summary: str
    scores_tokens: bool
    thresholded: bool
    predictor: Callable[[Any], bool] = lambda config: False
    aux_loss: Callable[[Any], bool] = lambda config: False
    needs_received_attention: bool = False

    def load(self) -> type:
        return load_target(self.target)


_ROUTERS: Registry[RouterSpec] = Registry("router", reserved=(NO_ROUTER,))


def register_router(spec: RouterSpec) -> RouterSpec:
    """Add a router to the registry (a name may be registered once)."""
    return _ROUTERS.register(spec)


def router_names() -> tuple[str, ...]:
    """Registered router names, in registration order."""
    return _ROUTERS.names()


def router_spec(name: str) -> RouterSpec:
    """The spec of a registered router; one-line ValueError naming the value otherwise."""
    return _ROUTERS.get(name)


register_router(
    RouterSpec(
        "learned",
        "modlm.routing.expert_choice:LearnedRouter",
        "MoD expert-choice top-k on a learned score r = w·x (the paper's router)",
        scores_tokens=True,
        thresholded=True,
        predictor=lambda c: c.causal_routing in ("predictor", "both"),
        aux_loss=lambda c: c.causal_routing in ("aux_loss", "both"),
    )
)
register_router(
    RouterSpec(
        "random",
        "modlm.routing.stochastic:RandomRouter",
        "baseline: a random k tokens per sequence, unit weight, no parameters",
        scores_tokens=False,
        thresholded=False,
    )
)
register_router(
    RouterSpec(
        "token_choice",
        "modlm.routing.token_choice:TokenChoiceRouter",
        "baseline: each token decides with a sigmoid gate, capped at k slots, balancing loss",
        scores_tokens=True,
        thresholded=True,
    )
)
register_router(
    RouterSpec(
        "attention",
        "modlm.routing.attention_based:AttentionRouter",
        "A-MoD: top-k of the attention received in the previous block, no score parameters; decodes by a predictor",
        scores_tokens=False,
        thresholded=True,
        predictor=lambda c: True,
        aux_loss=lambda c: False,
        needs_received_attention=True,
    )
)
register_router(
    RouterSpec(
        "tuned",
        "modlm.routing.tuned:TunedRouter",
        "router tuning of a pretrained model (modlm adapt): zero-init score, unit-weight updates, causal threshold",
        scores_tokens=True,
        thresholded=True,
    )
)
register_router(
    RouterSpec(
        "gate",
        "modlm.routing.gate:GateRouter",
        "hard causal gates for adaptation (modlm adapt): s > threshold in training and decoding, "
        "straight-through to every token, attention sinks always processed",
        scores_tokens=True,
        thresholded=True,
    )
)
