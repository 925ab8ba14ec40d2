"""The gate router: one threshold rule in training and decoding, a keep-all start, attention
sinks always processed, cached decoding equal to recomputation, and distillation that learns."""

import numpy as np
import pytest
import torch

from modlm import ModelConfig, MoDTransformer
from modlm.adapt.config import AdaptConfig
from modlm.adapt.distill import kl_to_original, original_logits
from modlm.adapt.routers import adapt_model
from modlm.adapt.tune import tune_routers
from modlm.inference.calibrate import calibrate_thresholds, measure_routed_fraction
from modlm.inference.generate import generate
from modlm.model.block import route_mask
from modlm.routing.gate import GateRouter


def _dense(init_std=0.02):
    """A tiny Llama-shaped dense model; a larger ``init_std`` makes every block matter."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", router="none", layer_types=("dense",) * 4, init_std=init_std)
    return MoDTransformer(cfg).eval()


def _random_gates(model, std=0.3):
    with torch.no_grad():
        for i in model.config.routed_layers:
            torch.nn.init.normal_(model.blocks[i].router.weight, std=std)


def test_the_gates_start_open_and_the_model_computes_the_original_exactly():
    dense = _dense(0.15)
    model = adapt_model(dense, "gate", 0.25, layers=(1, 2))
    assert model.config.layer_types == ("dense", "keys-kept", "keys-kept", "dense")
    x = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        ref = dense(x).logits
        assert torch.equal(model(x, routing="causal").logits, ref)
        assert torch.equal(model(x).logits, ref)  # the training rule, too
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".router." in n for n in trainable)


@pytest.mark.parametrize("kind", ["keys-kept", "routed"])
def test_sinks_are_always_processed_and_training_decides_as_decoding(kind):
    cfg = ModelConfig.from_name("tiny", router="gate", routed_kind=kind, n_sink=3)
    router = GateRouter(cfg)
    router.threshold.fill_(float("inf"))  # nothing passes the threshold: only the sinks run
    x = torch.randn(2, 12, cfg.d_model)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :5] = False  # left padding: row 1's sinks are its tokens 5, 6, 7
    for routing in ("topk", "causal"):
        for m in (None, mask):
            out = router(x, routing, m)
            hits = route_mask(out, 12) if out.weight_BK is None else _processed(out, 12)
            want = torch.zeros(2, 12, dtype=torch.bool)
            want[:, :3] = True
            if m is not None:
                want[1] = False
                want[1, 5:8] = True
            assert torch.equal(hits, want), (routing, m is not None)
    _random_gates_router(router)
    router.threshold.fill_(0.0)
    sel, _ = router.decide(x)
    for routing in ("topk", "causal"):
        hits = _processed(router(x, routing), 12)
        assert torch.equal(hits, sel | (torch.arange(12) < 3)), routing


def _random_gates_router(router):
    with torch.no_grad():
        torch.nn.init.normal_(router.weight)


def _processed(out, T):
    """Tokens whose update counts: routed with a nonzero weight (a dense training route weighs
    skipped tokens 0)."""
    mask = route_mask(out, T)
    if out.weight_BK is None:
        return mask
    w_BT = torch.zeros(mask.shape).scatter_add(1, out.idx_BK, out.weight_BK.detach().float())
    return mask & (w_BT != 0)


def test_the_straight_through_gradient_reaches_skipped_tokens():
    cfg = ModelConfig.from_name("tiny", router="gate", routed_kind="keys-kept", n_sink=0)
    router = GateRouter(cfg)
    _random_gates_router(router)
    router.threshold.fill_(0.0)
    x = torch.randn(1, 16, cfg.d_model)
    out = router(x, "topk")
    skipped = ~router.decide(x)[0][0]
    assert skipped.any() and out.idx_BK.shape[1] == 16 and out.valid_BK is None
    grads = torch.autograd.grad(out.weight_BK[0, skipped].sum(), router.weight)[0]
    assert grads.abs().sum() > 0  # a skipped token's gate moves the score


def test_cached_decoding_equals_recomputation():
    model = adapt_model(_dense(0.15), "gate", 0.5, layers=(1, 2))
    _random_gates(model)
    x = torch.randint(0, 256, (3, 48))
    calibrate_thresholds(model, x, 0.5)
    prompt = x[:2, :8].tolist()  # longer than the sinks: decoded tokens decide by threshold
    res = generate(model, prompt, 10, temperature=0)
    full = torch.tensor([p + t for p, t in zip(prompt, res.tokens)])
    with torch.no_grad():
        logits = model(full, routing="causal").logits
    assert [row.tolist() for row in logits[:, 7:-1].argmax(-1)] == [list(t) for t in res.tokens]


def test_distillation_lowers_the_kl_at_a_fixed_capacity_and_calibration_keeps_it():
    dense = _dense(0.15)
    tokens = np.random.default_rng(0).integers(0, 256, 8000).astype(np.uint16)
    model = adapt_model(dense, "gate", 0.5, layers=(1, 2))
    _random_gates(model)
    x = torch.as_tensor(tokens[:256].astype(np.int64)).view(4, 64)

    def kl_at_capacity():
        calibrate_thresholds(model, x, 0.5)
        with torch.no_grad():
            return float(kl_to_original(model(x, routing="causal").logits, original_logits(model, x)))

    before = kl_at_capacity()
    cfg = AdaptConfig(
        router="gate", capacity=0.5, layers=(1, 2), seq_len=127, batch_size=2, steps=40, lr=0.3,
        calib_tokens=4096, loss="kl", max_loss_rise=0,
    )  # fmt: skip
    tune_routers(model, tokens, cfg)
    held = torch.as_tensor(tokens[-1025:-1].astype(np.int64)).view(8, 128)
    fracs = measure_routed_fraction(model, held)  # calibrated on other windows
    for frac in fracs.values():
        assert abs(frac - 0.5) <= 0.05, fracs
    after = kl_at_capacity()
    # measured: 0.410 -> 0.372 (-9%)
    print(f"KL at capacity 0.5: {before:.4f} -> {after:.4f}; held-out compute {fracs}")
    assert after < 0.95 * before, (before, after)
