"""One rank of the FSDP-equals-one-process check (``test_distributed.py`` launches two under
torchrun, gloo on CPU): train ``tiny`` a few steps on this rank's half of each global batch
behind ``--parallel fsdp`` and write, on rank 0, the losses, gradient norms and the gathered
weights to ``OUT.json`` / ``OUT.safetensors``.

    python -m torch.distributed.run --nproc_per_node=2 tests/training/fsdp_worker.py OUT
"""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import save_file

from modlm.training.distributed import dist_info_from_env, process_group, wrap_model
from modlm.training.optim import clip_gradients, clip_groups

# Shared with the single-process reference in test_distributed.py.
STEPS, GLOBAL_BATCH, SEQ_LEN, LR, CLIP = 3, 4, 32, 3e-3, 0.5


def build(seed: int = 0):
    """The model (no buffers that follow each rank's own batches: aux-loss routing), its optimizer."""
    from modlm.config import ModelConfig
    from modlm.model.transformer import MoDTransformer
    from modlm.training.config import TrainConfig
    from modlm.training.optim import build_optimizer

    torch.manual_seed(seed)
    model = MoDTransformer(ModelConfig.from_name("tiny", causal_routing="aux_loss"))
    return model, lambda m: build_optimizer(
        m, TrainConfig(model="tiny", seq_len=SEQ_LEN, lr=LR, warmup_steps=0, max_steps=STEPS)
    )


def batch(step: int) -> torch.Tensor:
    """The global batch of ``step`` (GLOBAL_BATCH, SEQ_LEN + 1), the same on every rank."""
    return torch.randint(0, 256, (GLOBAL_BATCH, SEQ_LEN + 1), generator=torch.Generator().manual_seed(step))


def train_step(model, forward, optimizer, groups, tokens_BT) -> tuple[float, float]:
    out = forward(tokens_BT[:, :-1], tokens_BT[:, 1:])
    out.loss.backward()
    norm = clip_gradients(groups, CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out.loss.detach(), norm.detach()


def main(out: str) -> None:
    torch.set_num_threads(1)
    info = dist_info_from_env()
    with process_group(info, torch.device("cpu")) as info:
        model, make_optimizer = build()
        wrapped = wrap_model(model, info, torch.device("cpu"), strategy="fsdp")
        optimizer = make_optimizer(model)
        groups = clip_groups(model)
        per_rank = GLOBAL_BATCH // info.world_size
        losses, norms = [], []
        for step in range(STEPS):
            rows = batch(step)[info.rank * per_rank : (info.rank + 1) * per_rank]
            loss, norm = train_step(model, wrapped.module, optimizer, groups, rows)
            # The global batch's loss: each rank's mean over equal halves, averaged.
            torch.distributed.all_reduce(loss)
            losses.append(loss.item() / info.world_size)
            norms.append(norm.item())
        weights, _ = wrapped.gather_state(optimizer)
        if info.main:
            save_file({k: v.contiguous() for k, v in weights.items() if k != "lm_head.weight"}, out + ".safetensors")
            with open(out + ".json", "w") as f:
                json.dump({"losses": losses, "grad_norms": norms, "world_size": info.world_size}, f)


if __name__ == "__main__":
    main(sys.argv[1])
