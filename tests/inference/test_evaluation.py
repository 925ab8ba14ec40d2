"""The one held-out loss loop equals each loop it replaced, and the one block-compute measure."""

import math

import numpy as np
import pytest
import torch

from modlm import ModelConfig, MoDTransformer
from modlm.inference.calibrate import calibrate_thresholds
from modlm.inference.evaluation import (
    block_compute_fraction,
    decode_compute_fraction,
    evaluate_lm,
    window_batches,
)
from modlm.inference.generate import generate
from modlm.model.block import route_mask
from modlm.training.batching import iter_eval_batches
from modlm.training.config import TrainConfig, stream_seed
from modlm.training.evaluation import evaluate


def _model(**kw):
    torch.manual_seed(0)
    return MoDTransformer(ModelConfig.from_name("tiny", **kw)).eval()


def _windows(B=6, T=33, seed=1):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _one_window_per_forward(model, windows_BT1, routing):
    """The adaptation study's former loop: (perplexity, block compute kept)."""
    total, n, kept = 0.0, 0, []
    L = model.config.n_layers
    for w in windows_BT1:
        out = model(w[None, :-1], w[None, 1:], routing=routing)
        total += float(out.lm_loss) * (w.numel() - 1)
        n += w.numel() - 1
        routed = [float(route_mask(r, w.numel() - 1).float().mean()) for r in out.routes.values()]
        kept.append((L - len(routed) + sum(routed)) / L)
    return math.exp(total / n), sum(kept) / len(kept)


@torch.no_grad()
def _batched_perplexity(model, windows_BT1, routing, batch):
    """``modlm bench adapt``'s former loop."""
    total, n = 0.0, 0
    for i in range(0, windows_BT1.shape[0], batch):
        w = windows_BT1[i : i + batch]
        out = model(w[:, :-1], w[:, 1:], routing=routing)
        total += float(out.lm_loss) * w[:, 1:].numel()
        n += w[:, 1:].numel()
    return math.exp(total / n)


@pytest.mark.parametrize("routing", ["topk", "causal"])
def test_the_one_loop_equals_the_former_per_caller_loops(routing):
    model, val = _model(), _windows()
    calibrate_thresholds(model, val[:, :-1], 0.5)
    whole = evaluate_lm(model, window_batches(model, val), routing=routing)
    with torch.no_grad():  # the calibration sweep's former loss: one forward over every window
        ref = float(model(val[:, :-1], targets_BT=val[:, 1:], routing=routing).lm_loss)
    assert whole.loss == ref and whole.tokens == val[:, 1:].numel()
    one = evaluate_lm(model, window_batches(model, val, 1), routing=routing)
    ppl, kept = _one_window_per_forward(model, val, routing)
    assert one.perplexity == pytest.approx(ppl, rel=1e-12)
    assert one.compute_fraction == pytest.approx(kept, rel=1e-12)
    two = evaluate_lm(model, window_batches(model, val, 2), routing=routing)
    assert two.perplexity == pytest.approx(_batched_perplexity(model, val, routing, 2), rel=1e-12)


def test_the_training_evaluation_equals_its_former_loop():
    model = _model(router="random")  # a random router: the fixed seed must give the same estimate
    data = np.random.default_rng(0).integers(0, 256, 4000).astype(np.uint16)
    cfg = TrainConfig(model="tiny", batch_size=2, seq_len=32, eval_batches=3, seed=5)
    total, n, fracs = torch.zeros((), dtype=torch.float64), 0, []
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(cfg.seed, 0, "eval"))
        for x, y in iter_eval_batches(data, cfg.batch_size, cfg.seq_len, cfg.eval_batches):
            out = model(x, y, routing="topk")
            total += out.lm_loss.double() * y.numel()
            n += y.numel()
            routed = [v for k, v in out.router_stats().items() if k.endswith("/routed_frac")]
            fracs.append(sum(routed) / len(routed))
    state = torch.random.get_rng_state()
    res = evaluate(model, data, cfg, torch.device("cpu"))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's stream did not move
    assert res["loss"] == (total / n).item() and res["tokens"] == n
    assert res["routed_frac"] == sum(fracs) / len(fracs)
    assert evaluate(model, data, cfg, torch.device("cpu")) == res


def test_evaluation_restores_the_mode_and_refuses_bad_windows():
    model = _model().train()
    evaluate_lm(model, window_batches(model, _windows()))
    assert model.training
    with pytest.raises(ValueError, match=r"\(B, T\+1\) tensor"):
        list(window_batches(model, torch.zeros(5, dtype=torch.long)))
    with pytest.raises(ValueError, match="batch_size=0 is invalid"):
        list(window_batches(model, _windows(), 0))
    with pytest.raises(ValueError, match="max_seq_len=128"):
        list(window_batches(model, _windows(T=200)))


def test_block_compute_fraction_of_an_evaluation_and_of_a_traced_decode():
    assert block_compute_fraction(30, {i: 0.25 for i in range(12)}) == pytest.approx(1 - 12 * 0.75 / 30)
    assert block_compute_fraction(4, {}) == 1.0
    model, val = _model(), _windows()
    calibrate_thresholds(model, val[:, :-1], 0.25)
    res = evaluate_lm(model, window_batches(model, val), routing="causal")
    L, routed = model.config.n_layers, model.config.routed_layers
    assert set(res.layer_fractions) == set(routed)
    assert res.compute_fraction == pytest.approx((L - len(routed) + sum(res.layer_fractions.values())) / L)
    traced = generate(model, val[:1, :8].tolist(), 12, temperature=0, trace=True)
    steps = [s for row in traced.routing for s in row]
    by_hand = (L - len(routed) + sum(sum(i in s for s in steps) / len(steps) for i in routed)) / L
    assert decode_compute_fraction(model, traced) == pytest.approx(by_hand)
    assert 0 < decode_compute_fraction(model, traced) < 1
