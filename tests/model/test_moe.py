"""The MoE feed-forward and the MoE / MoDE block kinds: equivalences with the dense model."""

import pytest
import torch

from modlm import ModelConfig, MoDTransformer
from modlm.model.layers import MLP
from modlm.model.moe import MoE
from modlm.routing.moe_ops import topk_gates


def tiny(**kw):
    return ModelConfig.from_name("tiny", **kw)


def _moe_from_mlp(mlp: MLP, moe: MoE) -> None:
    """Put the dense MLP's weights into expert 0 (x @ w layouts are the transposes)."""
    with torch.no_grad():
        moe.w_gate_up[0].copy_(mlp.gate_up.weight.t())
        moe.w_down[0].copy_(mlp.down.weight.t())


def test_one_expert_top1_no_drop_equals_the_dense_mlp():
    cfg = tiny(router="none", block_kind="moe", n_experts=1, moe_top_k=1)
    torch.manual_seed(0)
    mlp, moe = MLP(cfg), MoE(cfg)
    torch.nn.init.normal_(moe.router.weight)
    _moe_from_mlp(mlp, moe)
    h = torch.randn(3, 17, cfg.d_model)
    y, aux = moe(h, "topk")
    torch.testing.assert_close(y, mlp(h))
    assert float(aux.stats["dropped_frac"]) == 0 and float(aux.stats["expert_tokens"]) == 3 * 17


def test_one_expert_moe_model_equals_the_dense_model():
    dense_cfg = tiny(router="none")
    torch.manual_seed(0)
    dense = MoDTransformer(dense_cfg)
    moe_model = MoDTransformer(dense_cfg.replace(block_kind="moe", n_experts=1, moe_top_k=1))
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing = moe_model.load_state_dict(state, strict=False).missing_keys
    assert all(".mlp." in k for k in missing)
    for blk_d, blk_m in zip(dense.blocks, moe_model.blocks):
        _moe_from_mlp(blk_d.mlp, blk_m.mlp)
    x = torch.randint(0, 256, (2, 40))
    ref, out = dense(x, x), moe_model(x, x)
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.lm_loss, ref.lm_loss)
    # the MoE losses are the only difference: one expert is perfectly balanced (f = P = 1)
    torch.testing.assert_close(out.router_stats()["L0/balance_loss"], 1.0)


def test_capacity_drops_tokens_which_ride_the_residual_and_causal_never_drops():
    cfg = tiny(router="none", block_kind="moe", n_experts=4, moe_top_k=2, moe_capacity_factor=0.25)
    torch.manual_seed(1)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.w_gate_up, std=0.1)
    torch.nn.init.normal_(moe.w_down, std=0.1)
    torch.nn.init.normal_(moe.router.weight)
    h = torch.randn(2, 32, cfg.d_model)
    y, aux = moe(h, "topk")
    cap = max(1, round(0.25 * 2 * 64 / 4))
    assert float(aux.stats["expert_tokens"]) <= 4 * cap
    assert 0 < float(aux.stats["dropped_frac"]) < 1
    zero_rows = (y.view(64, -1) == 0).all(-1)
    assert 0 < int(zero_rows.sum()) < 64  # fully dropped tokens: exactly no update
    y_c, aux_c = moe(h, "causal")
    assert float(aux_c.stats["dropped_frac"]) == 0 and not bool((y_c.view(64, -1) == 0).all(-1).any())
    # each token's causal output depends on that token alone
    y_one, _ = moe(h[:1, 5:6], "causal")
    torch.testing.assert_close(y_one[0, 0], y_c[0, 5])


def test_noop_experts_are_free_and_reported():
    cfg = tiny(router="none", block_kind="mode-integrated", n_experts=2, n_noop_experts=3, moe_top_k=2)
    torch.manual_seed(2)
    moe = MoE(cfg, n_noop=3)
    torch.nn.init.normal_(moe.w_gate_up, std=0.1)
    torch.nn.init.normal_(moe.w_down, std=0.1)
    torch.nn.init.normal_(moe.router.weight)
    h = torch.randn(2, 30, cfg.d_model)
    y, aux = moe(h, "topk")
    logits = h.view(60, -1) @ moe.router.weight.t()
    _, expert, _ = topk_gates(logits, 2)
    real = expert < 2
    assert float(aux.stats["noop_frac"]) == pytest.approx(float((~real).float().mean()))
    assert float(aux.stats["expert_tokens"]) == int(real.sum())
    both_noop = ~real.any(-1)
    assert bool(both_noop.any()) and bool((y.view(60, -1)[both_noop] == 0).all())


def test_balance_and_z_losses_match_their_formulas_and_train_the_router():
    cfg = tiny(router="none", block_kind="moe", n_experts=4, moe_top_k=2, moe_balance_weight=0.5, moe_z_weight=0.25)
    torch.manual_seed(3)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.router.weight)
    torch.nn.init.normal_(moe.w_gate_up, std=0.1)
    torch.nn.init.normal_(moe.w_down, std=0.1)
    h = torch.randn(2, 16, cfg.d_model)
    y, aux = moe(h, "topk")
    logits = h.view(32, -1) @ moe.router.weight.t()
    probs, expert, _ = topk_gates(logits, 2)
    f = torch.bincount(expert.flatten(), minlength=4).float() / expert.numel()
    balance = 4 * (f * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(aux.stats["balance_loss"], balance)
    torch.testing.assert_close(aux.stats["z_loss"], z)
    torch.testing.assert_close(aux.aux_loss, 0.5 * balance + 0.25 * z)
    (y.sum() + aux.aux_loss).backward()
    assert moe.router.weight.grad.abs().sum() > 0 and moe.w_down.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "preset", ["tiny-moe", "tiny-mode-staged", "tiny-mode-integrated", "tiny-early-exit", "tiny-keys-kept"]
)
def test_new_kinds_train_with_aux_losses_and_every_parameter_has_a_role(preset):
    from modlm.spec.roles import parameter_roles

    torch.manual_seed(0)
    model = MoDTransformer(ModelConfig.from_name(preset))
    parameter_roles(model)  # raises if a new parameter has no declared role
    x = torch.randint(0, 256, (2, 32))
    out = model(x, x)
    # the total is the LM loss plus the blocks' aux losses, nothing stashed elsewhere
    torch.testing.assert_close(out.lm_loss, torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), x.flatten()))
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    assert float(out.aux_loss.detach()) > 0
    out.loss.backward()
    stats = out.router_stats()
    if preset == "tiny-mode-integrated":
        assert all(f"L{i}/noop_frac" in stats for i in range(4))
    if preset == "tiny-early-exit":
        assert sorted(k for k in stats if k.endswith("exit_loss")) == [f"L{i}/exit_loss" for i in (1, 2, 3)]


@pytest.mark.parametrize("top_k,n_noop", [(1, 0), (1, 3), (2, 3)])
def test_the_lm_loss_trains_the_router_at_top1_and_with_noops(top_k, n_noop):
    kind = "mode-integrated" if n_noop else "moe"
    cfg = tiny(router="none", block_kind=kind, n_experts=2, n_noop_experts=n_noop, moe_top_k=top_k)
    torch.manual_seed(4)
    moe = MoE(cfg, n_noop=n_noop)
    torch.nn.init.normal_(moe.router.weight)
    torch.nn.init.normal_(moe.w_gate_up, std=0.1)
    torch.nn.init.normal_(moe.w_down, std=0.1)
    y, _ = moe(torch.randn(2, 16, cfg.d_model), "topk")
    y.pow(2).sum().backward()  # the output alone, no aux loss: the gate must carry a gradient
    assert moe.router.weight.grad.abs().sum() > 0
