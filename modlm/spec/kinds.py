"""The registry of block kinds: ``ModelConfig.layer_types`` names -> ``BlockSpec``. No torch import.

Every block kind implements one contract (``modlm.model.block``); this table says, without
building anything, what config validation, FLOP accounting and the per-layer caches need to know
about each kind. A new kind (MoE, MoDE, early exit ...) is a module plus one ``register_block``.
"""

from __future__ import annotations

from dataclasses import dataclass

from modlm.spec.registry import Registry, load_target


@dataclass(frozen=True)
class BlockSpec:
    """name: the ``layer_types`` entry. target: "module:Class" of the block.
    routed: a MoD router decides which tokens the block processes (it needs
        ``ModelConfig.router != "none"``, and its FLOPs run at the capacity).
    cache_layout: the KV cache this layer needs when decoding: "contiguous" (every row holds
        every token) or "ragged" (rows hold only the tokens processed there).
    dense_kind: the kind this layer takes in the dense twin (same attention, a dense MLP).
    moe: its feed-forward is a Mixture-of-Experts (``modlm.model.moe``; FLOPs by expert tokens).
    noop_experts: its MoE has ``ModelConfig.n_noop_experts`` no-op experts (integrated MoDE).
    exit_gate: a token may leave the model at this layer's input (early exit); when it does, it
        has no keys or values here (the ``ragged`` cache), and its gate evaluates the LM head.
    keeps_keys: (a routed kind) a token the router skips still computes its key and value here
        and stays visible to later tokens (FlexiDepth's rule, ``modlm.model.keys_kept``): the
        key/value projections run over every token, the rest of the block over the routed ones.
    """

    name: str
    target: str
    routed: bool
    cache_layout: str
    dense_kind: str
    moe: bool = False
    noop_experts: bool = False
    exit_gate: bool = False
    keeps_keys: bool = False

    def load(self) -> type:
        return load_target(self.target)


_BLOCKS: Registry[BlockSpec] = Registry("block kind")


def register_block(spec: BlockSpec) -> BlockSpec:
    return _BLOCKS.register(spec)


def block_kinds() -> tuple[str, ...]:
    return _BLOCKS.names()


def block_spec(name: str) -> BlockSpec:
    return _BLOCKS.get(name)


register_block(
    BlockSpec("dense", "modlm.model.block:DenseBlock", routed=False, cache_layout="contiguous", dense_kind="dense")
)
register_block(
    BlockSpec("routed", "modlm.model.block:RoutedBlock", routed=True, cache_layout="ragged", dense_kind="dense")
)
register_block(
    BlockSpec(
        "moe", "modlm.model.moe_blocks:MoEBlock", routed=False, cache_layout="contiguous", dense_kind="dense", moe=True
    )
)
register_block(
    BlockSpec(
        "mode-staged",
        "modlm.model.moe_blocks:StagedMoDEBlock",
        routed=True,
        cache_layout="ragged",
        dense_kind="dense",
        moe=True,
    )
)
register_block(
    BlockSpec(
        "mode-integrated",
        "modlm.model.moe_blocks:IntegratedMoDEBlock",
        routed=False,
        cache_layout="contiguous",
        dense_kind="dense",
        moe=True,
        noop_experts=True,
    )
)
register_block(
    BlockSpec(
        "exit",
        "modlm.model.early_exit:EarlyExitBlock",
        routed=False,
        cache_layout="ragged",
        dense_kind="dense",
        exit_gate=True,
    )
)
register_block(
    BlockSpec(
        "keys-kept",
        "modlm.model.keys_kept:KeysKeptBlock",
        routed=True,
        cache_layout="contiguous",  # every token's key and value is stored
        dense_kind="dense",
        keeps_keys=True,
    )
)
