"""Parallelism applied from outside the model: the strategy table, DDP's settings and its
gradients in a world of one, the collective helpers and the parameter digest. The two-process
run is in test_trainer.py (torchrun)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from modlm.config import ModelConfig
from modlm.model.transformer import MoDTransformer
from modlm.training.distributed import (
    STRATEGIES,
    DistInfo,
    all_gather,
    all_reduce_max,
    all_reduce_mean_,
    param_digest,
    process_group,
    strategy_for,
    wrap_model,
)

CPU = torch.device("cpu")


def _model(seed: int = 0) -> MoDTransformer:
    torch.manual_seed(seed)
    return MoDTransformer(ModelConfig.from_name("tiny"))


def _grads(model, x_BT) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(x_BT, x_BT).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_strategy_follows_the_world_size():
    assert set(STRATEGIES) >= {"none", "ddp"}
    assert strategy_for(DistInfo()) == "none"
    assert strategy_for(DistInfo(rank=1, world_size=2, local_rank=1)) == "ddp"


def test_a_world_of_one_runs_the_model_itself():
    model = _model()
    wrapped = wrap_model(model, DistInfo(), CPU)
    assert wrapped.module is model and wrapped.strategy == "none"
    with wrapped.no_sync():  # a no-op context
        pass


def test_unknown_strategy_is_refused_by_name():
    with pytest.raises(ValueError, match=r"'fsdp3' is unknown; known: none, ddp"):
        wrap_model(_model(), DistInfo(), CPU, strategy="fsdp3")


def test_no_process_group_in_a_world_of_one():
    with process_group(DistInfo(), CPU) as info:
        assert info == DistInfo() and not dist.is_initialized()
        t = torch.arange(3.0)
        assert all_gather(t, info, CPU)[0] is t
        assert torch.equal(all_reduce_mean_(t.clone(), info), t)
        assert all_reduce_max(1, info, CPU) == 1


@pytest.fixture
def gloo_world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# NOTE: torch deprecates broadcast_buffers in favour of forward_sync_buffers; the strategy keeps the
# flag it has always passed (same behaviour), so the warning is expected here.
@pytest.mark.filterwarnings("ignore:`broadcast_buffers` is deprecated:FutureWarning")
def test_ddp_keeps_its_settings_and_the_model_gradients(gloo_world_of_one):
    model, reference = _model(), _model()
    wrapped = wrap_model(model, DistInfo(), CPU, strategy="ddp")
    ddp = wrapped.module
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel) and ddp.module is model
    assert ddp.broadcast_buffers is False and ddp.find_unused_parameters is False
    x_BT = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = _grads(reference, x_BT)
    with wrapped.no_sync():  # an accumulation micro-step: gradients stay local
        wrapped.module(x_BT, x_BT).loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], msg=n)


def test_param_digest_sees_parameters_not_buffers():
    a, b = _model(), _model()
    assert param_digest(a) == param_digest(b)
    b.blocks[1].router.predictor.r_mean.add_(1.0)  # per-rank running statistics may differ
    assert param_digest(a) == param_digest(b)
    with torch.no_grad():
        b.norm.weight[0] += 1e-3
    assert param_digest(a) != param_digest(b)


@pytest.mark.filterwarnings("ignore:`broadcast_buffers` is deprecated:FutureWarning")
@pytest.mark.parametrize("preset", ["tiny-mode-integrated", "tiny-mode-staged"])
def test_ddp_runs_moe_kinds_with_every_parameter_getting_a_gradient(gloo_world_of_one, preset):
    torch.manual_seed(0)
    model = MoDTransformer(ModelConfig.from_name(preset))
    torch.manual_seed(0)
    reference = MoDTransformer(ModelConfig.from_name(preset))
    wrapped = wrap_model(model, DistInfo(), CPU, strategy="ddp")
    x_BT = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = _grads(reference, x_BT)
    wrapped.module(x_BT, x_BT).loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() == {n for n, _ in model.named_parameters()}
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], msg=n)
