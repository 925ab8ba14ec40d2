"""Parallelism applied from outside the model: the strategy table, DDP's settings and its
gradients in a world of one, FSDP2 over two processes against one, activation checkpointing,
the collective helpers and the parameter digest. The two-process training runs (DDP, FSDP and
its resume) are in test_trainer.py (torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from modlm.config import ModelConfig
from modlm.model.transformer import MoDTransformer
from modlm.training.config import PARALLEL
from modlm.training.distributed import (
    STRATEGIES,
    DistInfo,
    all_gather,
    all_reduce_max,
    all_reduce_mean_,
    apply_activation_checkpointing,
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
    assert set(STRATEGIES) >= {"none", "ddp", "fsdp"}
    assert set(PARALLEL) == {"auto", *STRATEGIES}  # TrainConfig's choices (named without torch)
    two = DistInfo(rank=1, world_size=2, local_rank=1)
    assert strategy_for(DistInfo()) == "none" and strategy_for(DistInfo(), "fsdp") == "none"
    assert strategy_for(two) == "ddp" and strategy_for(two, "ddp") == "ddp" and strategy_for(two, "fsdp") == "fsdp"
    with pytest.raises(ValueError, match=r"^TrainConfig\.parallel='none' is invalid under torchrun \(world size 2\)"):
        strategy_for(two, "none")


def test_a_world_of_one_runs_the_model_itself():
    model = _model()
    wrapped = wrap_model(model, DistInfo(), CPU)
    assert wrapped.module is model and wrapped.strategy == "none"
    with wrapped.no_sync():  # a no-op context
        pass


def test_unknown_strategy_is_refused_by_name():
    with pytest.raises(ValueError, match=r"'fsdp3' is unknown; known: none, ddp, fsdp"):
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


def test_activation_checkpointing_keeps_names_losses_gradients_and_statistics():
    """Recomputing the blocks' updates in the backward changes no number and no parameter name,
    and the routing runs once: the predictor's running statistics move as without it."""
    for router in ("learned", "random"):
        torch.manual_seed(0)
        ref = MoDTransformer(ModelConfig.from_name("tiny", router=router))
        torch.manual_seed(0)
        ckpt = MoDTransformer(ModelConfig.from_name("tiny", router=router))
        apply_activation_checkpointing(ckpt)
        assert [n for n, _ in ckpt.named_parameters()] == [n for n, _ in ref.named_parameters()]
        # Two batches: the first sets the running statistics, the second moves them by the EMA
        # (a recomputed router would move them twice).
        gen = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, 256, (2, 32), generator=gen) for _ in range(2)]
        torch.manual_seed(2)
        expected = [_grads(ref, x_BT) for x_BT in batches][-1]
        torch.manual_seed(2)
        got = [_grads(ckpt, x_BT) for x_BT in batches][-1]
        assert got.keys() == expected.keys()
        for n in expected:
            torch.testing.assert_close(got[n], expected[n], rtol=0, atol=0, msg=n)
        for (n, a), (_, b) in zip(ref.named_buffers(), ckpt.named_buffers()):
            assert torch.equal(a, b), n


@pytest.mark.slow
def test_fsdp_over_two_processes_equals_one_process(tmp_path):
    """FSDP2 (fully_shard per block, then the root) over 2 gloo ranks, each on half of every
    global batch, against one process on the whole batch: the losses, the clipped gradient
    norms and the weights after 3 AdamW steps agree to float32 rounding. The ranks sum their
    gradients in another order, so losses and norms agree to rtol 1e-5; AdamW divides by
    sqrt(v), which magnifies that rounding in near-zero gradient entries, so the weights (each
    step moves one by at most lr = 3e-3) agree to atol 1e-5 (seen: 3e-6)."""
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        import fsdp_worker as worker
    finally:
        sys.path.pop(0)
    out = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([*cmd, worker.__file__, str(out)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(out.with_suffix(".json").read_text())
    assert got["world_size"] == 2

    model, make_optimizer = worker.build()
    optimizer = make_optimizer(model)
    groups = worker.clip_groups(model)
    losses, norms = [], []
    for step in range(worker.STEPS):
        loss, norm = worker.train_step(model, model, optimizer, groups, worker.batch(step))
        losses.append(loss.item())
        norms.append(norm.item())
    assert max(norms) > worker.CLIP  # clipping was active, so the global norm mattered
    torch.testing.assert_close(got["losses"], losses, rtol=1e-5, atol=0)
    torch.testing.assert_close(got["grad_norms"], norms, rtol=1e-5, atol=0)
    from safetensors.torch import load_file

    sharded = load_file(str(out.with_suffix(".safetensors")))
    expected = {n: t for n, t in model.state_dict().items() if n != "lm_head.weight"}  # tied to tok_emb
    assert sharded.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(sharded[n], expected[n], rtol=0, atol=1e-5, msg=n)
