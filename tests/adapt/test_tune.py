"""tune_routers, built of the trainer's pieces, trains exactly what the former hand-written AdamW
loop trained (LM loss), for the same seed; the trainer's clipping applies when asked for."""

import math

import numpy as np
import pytest
import torch

from modlm import ModelConfig, MoDTransformer
from modlm.adapt.config import AdaptConfig
from modlm.adapt.routers import adapt_model
from modlm.adapt.tune import tune_routers
from modlm.inference.calibrate import calibrate_thresholds


def _dense():
    torch.manual_seed(0)
    return MoDTransformer(ModelConfig.from_name("tiny", router="none", layer_types=("dense",) * 4)).eval()


def _windows(tokens, n, length, gen):
    starts = torch.randint(0, len(tokens) - length, (n,), generator=gen).tolist()
    return torch.stack([torch.as_tensor(tokens[s : s + length].astype(np.int64)) for s in starts])


def _former_loop(model, tokens, cfg):
    """The loop ``modlm adapt`` had before it was made of the trainer's pieces."""
    gen = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    model.train()
    routers = [model.blocks[i].router for i in model.config.routed_layers]
    for step in range(1, cfg.steps + 1):
        ramp = min(1.0, (step - 1) / (cfg.anneal * cfg.steps)) if cfg.anneal > 0 else 1.0
        for r in routers:
            r.capacity = 1.0 - ramp * (1.0 - cfg.capacity)
        w = _windows(tokens, cfg.batch_size, cfg.seq_len + 1, gen)
        out = model(w[:, :-1], w[:, 1:])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    for r in routers:
        r.capacity = cfg.capacity
    model.eval()
    calib = _windows(tokens, max(1, math.ceil(cfg.calib_tokens / cfg.seq_len)), cfg.seq_len, gen)
    calibrate_thresholds(model, calib, cfg.capacity)


@pytest.mark.parametrize("router", ["tuned", "attention"])
def test_tuning_equals_the_former_loop_bit_for_bit(router):
    dense, tokens = _dense(), np.random.default_rng(0).integers(0, 256, 3000).astype(np.uint16)
    # The former loop minimised the LM loss; the collapse guard (on: it runs the original
    # alongside, without gradients) must not change a step.
    cfg = AdaptConfig(
        router=router, capacity=0.5, layers=(1, 2), seq_len=32, batch_size=2, steps=8, calib_tokens=96, loss="lm"
    )
    assert cfg.max_loss_rise > 0
    ref = adapt_model(dense, router, cfg.capacity, cfg.layers)
    _former_loop(ref, tokens, cfg)
    model = adapt_model(dense, router, cfg.capacity, cfg.layers)
    history = tune_routers(model, torch.as_tensor(tokens.astype(np.int64)), cfg, log_every=4)
    assert [r["step"] for r in history] == [4, 8] and not model.training
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_clipping_is_the_trainers_and_off_by_default():
    dense, tokens = _dense(), np.random.default_rng(1).integers(0, 256, 3000).astype(np.uint16)
    base = dict(router="tuned", capacity=0.5, layers=(1, 2), seq_len=32, steps=4, lr=1e-2, calib_tokens=64)
    states = {}
    for clip in (0.0, 1e9, 1e-6):
        model = adapt_model(dense, "tuned", 0.5, (1, 2))
        tune_routers(model, tokens, AdaptConfig(**base, grad_clip=clip))
        states[clip] = model.state_dict()
    assert all(torch.equal(states[0.0][k], v) for k, v in states[1e9].items())  # a norm never reached: no change
    assert any(not torch.equal(states[0.0][k], v) for k, v in states[1e-6].items())  # clipped: other steps
    with pytest.raises(ValueError, match="AdaptConfig.grad_clip=-1"):
        AdaptConfig(grad_clip=-1)


def test_a_sample_shorter_than_a_window_is_one_clear_error():
    model = adapt_model(_dense(), "tuned", 0.5, (1, 2))
    with pytest.raises(ValueError, match="the text sample has 20 tokens"):
        tune_routers(model, np.zeros(20, dtype=np.uint16), AdaptConfig(seq_len=32, steps=1))
