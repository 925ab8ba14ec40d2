"""Decode policy: how routed blocks decide, one new token per row, which rows they compute.

Axis legend: B batch rows, b rows that route into the block this step, D model width.

A decoded token routes causally (Raposo et al. 2024, §3.5): by the router's causal signal, never
by top-k over tokens that do not exist yet. ``HostDecisions`` brings each routed block's B
decisions to the host once (a copy of B fp32 logits, or B booleans), because the block must know
*which* rows to compute: computing every row and masking would save nothing. The block then runs
attention + MLP on those rows only (``RoutedBlock.compute_rows``) and the ragged cache stores
only their keys and values.

NOTE: that copy is one host sync per routed block and step on an accelerator, the price of a
data-dependent batch size. The cache's positions and slicing are host arithmetic afterwards.

A skipped block costs only the decision, so this path is kept to a handful of operators: for a
thresholded router (``RouterSpec.thresholded``) the fp32 logits are compared with the threshold
on the host (the learned router computes them folded, two products and one SiLU), and the
routed rows' weights are computed for those rows only; the RouterOutput reported for tracing
reuses constant tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
import torch.nn as nn

from modlm.routing.base import Router, RouterOutput
from modlm.spec.routers import NO_ROUTER, router_spec

__all__ = ["DecodePolicy", "HostDecisions", "RowPlan"]


class RowPlan(NamedTuple):
    """A decode policy's answer for one routed block and step: which rows to compute.

    rows: host list of the rows that route into the block (ascending), or None for every row.
    n_rows: how many rows run (0: the block is skipped for the whole batch).
    rows_host / rows_dev: the same rows as int64 tensors on the host (for the cache's
        host-side lengths) and on the model's device (for gathers); None when rows is None.
    weight_b1: the routed rows' weights (b, 1), None for unit weight.
    route: the RouterOutput reported for this block (decisions of every row).
    x_b1D: the routed rows of the block's input, when the policy gathered them already (to
        weigh them); None: the block gathers them itself.
    """

    rows: list[int] | None
    n_rows: int
    rows_host: torch.Tensor | None
    rows_dev: torch.Tensor | None
    weight_b1: torch.Tensor | None
    route: RouterOutput
    x_b1D: torch.Tensor | None = None


class DecodePolicy(Protocol):
    """How routed and early-exit blocks decide, one new token per row, which rows they compute.

    ``plan``: a routed block's rows, from its router's causal decision. ``plan_exit``: an
    early-exit block's rows: those of ``rows`` (still running) whose confidence ``gate(x)``
    stays at or below ``threshold``."""

    def plan(
        self, layer_idx: int, router: nn.Module, x_B1D: torch.Tensor, token_mask_B1: torch.Tensor | None
    ) -> RowPlan: ...

    def plan_exit(
        self, gate: Callable[[torch.Tensor], torch.Tensor], threshold: float, x_B1D: torch.Tensor, rows: list[int]
    ) -> RowPlan: ...


class HostDecisions:
    """The decode policy of ``DecodeSession``: decisions on the host, routed rows computed.

    Args:
        router_name: ``ModelConfig.router`` (its registry spec says whether decisions threshold
            a logit; "none", a dense model, has no routed block to plan).
    """

    def __init__(self, router_name: str):
        self.thresholded = router_name != NO_ROUTER and router_spec(router_name).thresholded
        self._const: dict[tuple[int, torch.device], tuple[torch.Tensor, ...]] = {}
        self._skip: dict[tuple[int, torch.device], RowPlan] = {}
        self._thr: dict[int, tuple[torch.Tensor, int, float]] = {}  # layer -> (buffer, version, value)

    def flags(self, layer_idx: int, router: Router, x_B1D: torch.Tensor) -> list[bool]:
        """The causal decision of each row's new token, as host booleans."""
        if self.thresholded:
            logits = router.causal_logits(x_B1D).view(-1).tolist()  # the one sync
            thr = self._threshold(layer_idx, router)
            return [v > thr for v in logits]
        sel_B1, _ = router.decide(x_B1D)
        return sel_B1.view(-1).tolist()

    def plan(self, layer_idx: int, router: Router, x_B1D: torch.Tensor, token_mask_B1: torch.Tensor | None) -> RowPlan:
        if x_B1D.shape[1] != 1:
            raise ValueError(f"decoding takes one new token per row, got shape {tuple(x_B1D.shape)}")
        flags = self.flags(layer_idx, router, x_B1D)
        if token_mask_B1 is not None:
            flags = [f and m for f, m in zip(flags, token_mask_B1.view(-1).tolist())]
        b, B = sum(flags), len(flags)
        idx_B1, zero, none_B1, all_B1 = self._constants(B, x_B1D.device)
        if b == 0:
            return self._skip_plan(B, x_B1D.device)
        if b == B:
            w_B1 = router.token_weights(x_B1D)
            return RowPlan(None, B, None, None, w_B1, RouterOutput(idx_B1, all_B1, w_B1, zero, {}))
        rows = [i for i, f in enumerate(flags) if f]
        rows_host = torch.tensor(rows)
        rows_dev = rows_host.to(x_B1D.device)
        sel_B1 = torch.tensor(flags, dtype=torch.bool).view(B, 1).to(x_B1D.device)
        x_b1D = x_B1D.index_select(0, rows_dev)  # gathered once: weighed here, computed by the block
        w_b1 = router.token_weights(x_b1D)  # the routed rows' weights only
        w_B1 = (
            None
            if w_b1 is None
            else torch.zeros(B, 1, dtype=w_b1.dtype, device=w_b1.device).index_copy_(0, rows_dev, w_b1)
        )
        return RowPlan(rows, b, rows_host, rows_dev, w_b1, RouterOutput(idx_B1, sel_B1, w_B1, zero, {}), x_b1D)

    def plan_exit(
        self, gate: Callable[[torch.Tensor], torch.Tensor], threshold: float, x_B1D: torch.Tensor, rows: list[int]
    ) -> RowPlan:
        """The rows of ``rows`` whose token keeps running (``gate(x) <= threshold``), unit weight.

        Only the running rows evaluate the gate (the LM head: what ``causal_forward_flops``
        counts). The RouterOutput reports the decisions of every row for tracing."""
        B, device = x_B1D.shape[0], x_B1D.device
        if rows:
            x_r = x_B1D if len(rows) == B else x_B1D.index_select(0, torch.tensor(rows, device=device))
            conf = gate(x_r).view(-1).tolist()  # the one host sync of this gate
            rows = [r for r, c in zip(rows, conf) if c <= threshold]
        if not rows:
            return self._skip_plan(B, device)
        idx_B1, zero, _, all_B1 = self._constants(B, device)
        if len(rows) == B:
            return RowPlan(None, B, None, None, None, RouterOutput(idx_B1, all_B1, None, zero, {}))
        sel_B1 = torch.zeros(B, 1, dtype=torch.bool)
        sel_B1[rows] = True
        rows_host = torch.tensor(rows, dtype=torch.long)
        route = RouterOutput(idx_B1, sel_B1.to(device), None, zero, {})
        return RowPlan(rows, len(rows), rows_host, rows_host.to(device), None, route)

    def _skip_plan(self, B: int, device: torch.device) -> RowPlan:
        """The plan of a block no row routes into, built once per (B, device) (read-only)."""
        key = (B, device)
        if key not in self._skip:
            idx_B1, zero, none_B1, _ = self._constants(B, device)
            self._skip[key] = RowPlan([], 0, None, None, None, RouterOutput(idx_B1, none_B1, None, zero, {}))
        return self._skip[key]

    def _threshold(self, layer_idx: int, router: Router) -> float:
        # The threshold as a Python float, re-read only when the buffer changes (calibration).
        t = router.threshold
        cached = self._thr.get(layer_idx)
        if cached is None or cached[0] is not t or cached[1] != t._version:
            cached = self._thr[layer_idx] = (t, t._version, float(t))
        return cached[2]

    def _constants(self, B: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(idx_B1 zeros, fp32 zero, all-False sel_B1, all-True sel_B1), built once per (B, device).
        Read-only: callers must not modify them."""
        key = (B, device)
        if key not in self._const:
            self._const[key] = (
                torch.zeros(B, 1, dtype=torch.long, device=device),
                torch.zeros((), dtype=torch.float32, device=device),
                torch.zeros(B, 1, dtype=torch.bool, device=device),
                torch.ones(B, 1, dtype=torch.bool, device=device),
            )
        return self._const[key]
