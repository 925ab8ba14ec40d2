"""Which layers matter: block influence, the layers to route, and the layer-removal baseline."""

from __future__ import annotations

import torch

from modlm.model.transformer import MoDTransformer

__all__ = ["block_influence", "least_influential_layers", "remove_least_influential", "remove_layers"]


@torch.no_grad()
def block_influence(model: MoDTransformer, tokens_BT: torch.Tensor) -> dict[int, float]:
    """Block influence of each layer (ShortGPT, arXiv 2403.03853): 1 - cos(x_in, x_out), the mean
    over tokens of how much a block turns the residual stream. Low: the block changes little."""
    found: dict[int, float] = {}
    hooks = []
    for i, blk in enumerate(model.blocks):

        def hook(module, args, output, i=i):
            x_in, x_out = args[0].float(), output[0].float()
            found[i] = float(1.0 - torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1).mean())

        hooks.append(blk.register_forward_hook(hook))
    try:
        model(tokens_BT)
    finally:
        for h in hooks:
            h.remove()
    return found


def least_influential_layers(influence: dict[int, float], n: int, spaced: bool = True) -> tuple[int, ...]:
    """The ``n`` layers of lowest block influence, never the first or the last; ``spaced``: no two
    adjacent (so each routed layer follows a dense one, whose attention A-MoD reads)."""
    last = max(influence)
    chosen: list[int] = []
    for i in sorted((i for i in influence if 0 < i < last), key=lambda i: influence[i]):
        if spaced and (i - 1 in chosen or i + 1 in chosen):
            continue
        chosen.append(i)
        if len(chosen) == n:
            break
    if len(chosen) < n:
        raise ValueError(f"only {len(chosen)} layers can be chosen (n={n} asked) from {len(influence)} layers")
    return tuple(sorted(chosen))


def remove_layers(dense: MoDTransformer, drop: tuple[int, ...]) -> MoDTransformer:
    """``dense`` without the layers in ``drop`` (the simplest baseline at equal compute): the
    remaining blocks keep their weights and order."""
    keep = [i for i in range(dense.config.n_layers) if i not in set(drop)]
    if not keep or dense.config.routed_layers:
        raise ValueError(
            f"cannot remove layers {sorted(drop)} of {dense.config.name!r}: give a dense model and keep one"
        )
    config = dense.config.replace(
        n_layers=len(keep), layer_types=None, route_start=0, name=f"{dense.config.name}-minus{len(drop)}"
    )
    with torch.random.fork_rng(devices=[]):
        model = MoDTransformer(config)
    state = {}
    for k, v in dense.state_dict().items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            if i in keep:
                state[k.replace(f"blocks.{i}.", f"blocks.{keep.index(i)}.", 1)] = v
        else:
            state[k] = v
    model.load_state_dict(state)
    param = next(dense.parameters())
    return model.to(device=param.device, dtype=param.dtype).eval()


def remove_least_influential(
    dense: MoDTransformer, tokens_BT: torch.Tensor, n_drop: int
) -> tuple[MoDTransformer, tuple[int, ...], dict[int, float]]:
    """``modlm adapt --method remove-layers``: ``dense`` without its ``n_drop`` blocks of lowest
    block influence on ``tokens_BT`` (never the first or the last). Returns the model, the
    dropped layers and the influence of every layer."""
    influence = block_influence(dense, tokens_BT)
    drop = least_influential_layers(influence, n_drop, spaced=False) if n_drop else ()
    return remove_layers(dense, drop), drop, influence
