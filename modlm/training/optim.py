"""AdamW parameter groups and gradient clipping, read off the parameter roles the modules declare
(``modlm.spec.roles``), never off parameter names.

Only trainable parameters (``requires_grad``) enter either, so a model frozen by
``roles.freeze_all_but`` trains exactly what it left trainable. A parameter whose module
declares no role is refused (ValueError naming it) before any step is taken.
"""

from __future__ import annotations

import torch
from torch import nn

from modlm.spec.roles import named_parameters_with_roles
from modlm.training.config import TrainConfig, lr_at

# The optimizer's groups, in order: decayed, then not decayed. The order is part of the checkpoint
# format: optimizer.json lists parameter names in group order and resume refuses any other order.
GROUP_DECAY = (True, False)
# Role.clip_group of everything the LM loss trains; its norm is the one a run reports.
LM_CLIP_GROUP = "lm"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups of the trainable parameters, one per ``GROUP_DECAY`` entry, each in
    ``named_parameters`` order (a tied weight appears once).

    Matrices decay; vectors (norm gains, biases, the router vector, the predictor biases) and the
    token embedding (tied lm_head) do not: decaying a norm gain or the router vector only shrinks
    a scale the next layer must undo, and decaying the embedding pulls rare tokens' rows to zero.
    """
    by_decay: dict[bool, list[nn.Parameter]] = {decay: [] for decay in GROUP_DECAY}
    for _, p, role in named_parameters_with_roles(model):
        if p.requires_grad:
            by_decay[role.decay].append(p)
    return [{"params": by_decay[decay], "weight_decay": weight_decay if decay else 0.0} for decay in GROUP_DECAY]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``param_groups(model, cfg.weight_decay)`` at the schedule's first learning rate;
    the fused kernel when the parameters live on CUDA."""
    groups = param_groups(model, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    kwargs = {"fused": True} if params and all(p.device.type == "cuda" for p in params) else {}
    return torch.optim.AdamW(groups, lr=lr_at(0, cfg), betas=(cfg.beta1, cfg.beta2), **kwargs)


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Set the groups' weight decay and betas from ``cfg`` (after loading a saved state, whose
    values would otherwise win: the current config's are identical unless changed)."""
    for group, decay in zip(optimizer.param_groups, GROUP_DECAY, strict=True):
        group["weight_decay"], group["betas"] = (cfg.weight_decay if decay else 0.0), (cfg.beta1, cfg.beta2)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """One learning rate for every group (the schedule has no per-group factors)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The trainable parameters by ``Role.clip_group``, each in ``named_parameters`` order.

    The LM group is always there (maybe empty, when only routing parameters train). The causal
    predictors form a group of their own: their BCE never reaches the LM (its inputs are
    detached), and a spike in it must not shrink the LM's step through a shared global norm.
    """
    groups: dict[str, list[nn.Parameter]] = {LM_CLIP_GROUP: []}
    for _, p, role in named_parameters_with_roles(model):
        if p.requires_grad:
            groups.setdefault(role.clip_group, []).append(p)
    return groups


def clip_gradients(groups: dict[str, list[nn.Parameter]], max_norm: float) -> torch.Tensor:
    """Clip each group's gradients to a total norm of ``max_norm`` on its own (``clip_groups``).

    Returns the LM group's total gradient norm before clipping (a 0-dim tensor).
    """
    norms = {name: _clip_group(params, max_norm) for name, params in groups.items()}
    return norms[LM_CLIP_GROUP]


def _clip_group(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` of one group; with FSDP-sharded gradients, the global norm: the
    sharded gradients' norm gathered over the ranks, combined with that of the whole (0-dim,
    already averaged) ones every rank holds alike."""
    from modlm.training.distributed import full_tensor, is_sharded

    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if is_sharded(g)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    whole = [g for g in grads if not is_sharded(g)]
    total = full_tensor(torch.nn.utils.get_total_norm(sharded))
    if whole:
        total = torch.linalg.vector_norm(torch.stack([total, torch.nn.utils.get_total_norm(whole).to(total.device)]))
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
