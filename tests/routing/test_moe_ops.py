"""MoE dispatch and combine, each op against a slow per-token reference."""

import torch
import torch.nn.functional as F

from modlm.routing.moe_ops import combine, dispatch_plan, expert_capacity, expert_mlps, topk_gates


def _slow_assignments(expert_Nk, n_experts, capacity, valid_N=None):
    """(token, choice, expert) kept, by a Python walk in choice-major order (first come first served)."""
    N, k = expert_Nk.shape
    taken = [0] * n_experts
    kept = []
    for j in range(k):
        for n in range(N):
            e = int(expert_Nk[n, j])
            if valid_N is not None and not valid_N[n]:
                continue
            if e >= n_experts:
                continue  # a no-op expert: nothing to compute
            if capacity is not None and taken[e] >= capacity:
                continue
            taken[e] += 1
            kept.append((n, j, e))
    return kept


def test_topk_gates_fp32_renormalised_and_stable():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 6, generator=g).half()
    probs, expert, gate = topk_gates(logits, 2)
    assert probs.dtype == gate.dtype == torch.float32
    torch.testing.assert_close(gate.sum(-1), torch.ones(50))
    ref = torch.softmax(logits.float(), -1).topk(2, -1)
    assert torch.equal(expert, ref.indices)
    # ties go to the lower expert id
    _, e_tie, _ = topk_gates(torch.zeros(3, 4), 2)
    assert e_tie.tolist() == [[0, 1]] * 3
    # top-1: the chosen probability itself (a renormalised single gate would be 1, untrainable)
    p1, e1, g1 = topk_gates(logits, 1)
    assert torch.equal(e1[:, 0], ref.indices[:, 0])
    torch.testing.assert_close(g1[:, 0], ref.values[:, 0])
    assert bool((g1 < 1).all())


def test_dispatch_plan_equals_slow_reference_with_capacity_noops_and_padding():
    g = torch.Generator().manual_seed(1)
    N, k, E, X = 40, 2, 3, 5  # two no-op experts (ids 3, 4)
    expert = torch.stack([torch.randperm(X, generator=g)[:k] for _ in range(N)])
    valid = torch.rand(N, generator=g) > 0.2
    for capacity in (None, 4, 9):
        for v in (None, valid):
            plan = dispatch_plan(expert, E, X, capacity, v)
            ref = _slow_assignments(expert, E, capacity, v)
            # grouped by expert, token order within an expert (first choices first)
            ref_sorted = sorted(ref, key=lambda t: t[2])
            assert list(zip(plan.token_a.tolist(), plan.choice_a.tolist())) == [(n, j) for n, j, _ in ref_sorted]
            assert plan.counts == [sum(1 for *_, e in ref if e == x) for x in range(E)]
            assert bool((expert[plan.token_a, plan.choice_a] < E).all())


def test_expert_capacity_rounds_and_never_zero():
    assert expert_capacity(1.0, 2, 64, 8) == 16
    assert expert_capacity(0.01, 1, 4, 8) == 1
    assert expert_capacity(1.25, 2, 10, 4) == 6


def test_expert_mlps_and_combine_equal_per_token_reference():
    g = torch.Generator().manual_seed(2)
    N, D, Fh, E, k = 30, 8, 12, 4, 2
    x = torch.randn(N, D, generator=g)
    w1 = torch.randn(E, D, 2 * Fh, generator=g)
    w2 = torch.randn(E, Fh, D, generator=g)
    _, expert, gate = topk_gates(torch.randn(N, E, generator=g), k)
    plan = dispatch_plan(expert, E, E, capacity=5)
    y = expert_mlps(x.index_select(0, plan.token_a), plan.counts, w1, w2)
    out = combine(N, plan.token_a, gate[plan.token_a, plan.choice_a], y)
    ref = torch.zeros(N, D)
    kept = _slow_assignments(expert, E, 5)
    for n, j, e in kept:
        a, b = (x[n] @ w1[e]).chunk(2)
        ref[n] += gate[n, j] * ((F.silu(a) * b) @ w2[e])
    torch.testing.assert_close(out, ref)
    # a token none of whose choices was kept gets exactly zero
    untouched = sorted(set(range(N)) - {n for n, _, _ in kept})
    assert untouched and bool((out[untouched] == 0).all())
    # no rows at all: empty output, still the right width
    assert expert_mlps(x[:0], [0] * E, w1, w2).shape == (0, D)


def test_expert_mlps_backward_equals_autograd_of_the_reference_and_passes_gradcheck():
    g = torch.Generator().manual_seed(3)
    D, Fh, E = 5, 4, 3
    counts = [4, 0, 3]  # an expert with no rows gets zero gradients
    x = torch.randn(7, D, generator=g, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(E, D, 2 * Fh, generator=g, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(E, Fh, D, generator=g, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b, c: expert_mlps(a, counts, b, c), (x, w1, w2))
    dy = torch.randn(7, D, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(expert_mlps(x, counts, w1, w2), (x, w1, w2), dy)
    starts = [0, 4, 4]

    def ref(x, w1, w2):
        rows = []
        for e, (s, n) in enumerate(zip(starts, counts)):
            if n:
                a, b = (x[s : s + n] @ w1[e]).chunk(2, -1)
                rows.append((F.silu(a) * b) @ w2[e])
        return torch.cat(rows)

    want = torch.autograd.grad(ref(x, w1, w2), (x, w1, w2), dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert bool((got[1][1] == 0).all()) and bool((got[2][1] == 0).all())
