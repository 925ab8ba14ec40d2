"""Routers on a dense model: the adapted config, and the frozen keep-all copy tuning starts from."""

from __future__ import annotations

import torch

from modlm.adapt.config import default_layers
from modlm.config import ModelConfig
from modlm.inference.calibrate import set_thresholds
from modlm.model.transformer import MoDTransformer
from modlm.spec import roles

__all__ = ["adapt_model", "adapted_config", "with_routers"]


def adapted_config(base: ModelConfig, router: str, capacity: float, layers: tuple[int, ...] | None) -> ModelConfig:
    """``base`` with ``layers`` routed by ``router`` at ``capacity`` (the other layers dense)."""
    layers = default_layers(base.n_layers) if layers is None else tuple(layers)
    bad = [i for i in layers if not 0 <= i < base.n_layers]
    if bad:
        raise ValueError(f"layers {bad} are not layers of {base.name!r}: it has layers 0..{base.n_layers - 1}")
    # The gate router trains every token's update, which equals decoding only where a skipped
    # token keeps its key and value (``modlm.routing.gate``).
    routed = "keys-kept" if router == "gate" else "routed"
    kinds = tuple(routed if i in layers else "dense" for i in range(base.n_layers))
    return base.replace(
        router=router, capacity=float(capacity), layer_types=kinds, name=f"{base.name}-{router}-c{capacity:g}"
    )


def with_routers(
    dense: MoDTransformer, router: str, capacity: float, layers: tuple[int, ...] | None
) -> tuple[MoDTransformer, list[str]]:
    """A routed copy of ``dense`` (``adapted_config``) holding its weights, in eval mode, with the
    new routing parameters as initialised, on ``dense``'s device and dtype. Returns the model and
    the names of the parameters ``dense`` did not have."""
    config = adapted_config(dense.config, router, capacity, layers)
    with torch.random.fork_rng(devices=[]):  # the new routers' init must not move the caller's RNG
        model = MoDTransformer(config)
    missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all(".router." in k for k in missing), (missing, unexpected)
    param = next(dense.parameters())
    return model.to(device=param.device, dtype=param.dtype).eval(), missing


def adapt_model(
    dense: MoDTransformer, router: str = "tuned", capacity: float = 0.5, layers: tuple[int, ...] | None = None
) -> MoDTransformer:
    """A MoD copy of ``dense`` with routers on ``layers``: base weights copied and frozen, only the
    routing parameters trainable, every token processed (it computes what ``dense`` does):
    thresholds at -inf, or for ``gate`` its own open start (w = 0 above its threshold)."""
    if dense.config.routed_layers:
        raise ValueError(f"model {dense.config.name!r} is already routed: adapt a dense (converted) model")
    model, _ = with_routers(dense, router, capacity, layers)
    if router != "gate":  # the gates' soft gradient needs a finite threshold
        set_thresholds(model, float("-inf"))  # keep-all start
    roles.freeze_all_but(model, routing=True)
    return model.eval()
