"""Claims: verdicts against the noise, and the noise measured from the isoFLOP curves."""

import math

from modlm.experiments.claims import build_claims, verdict


def test_verdicts():
    assert verdict(0.05, 0.01) == "yes"
    assert verdict(-0.05, 0.01) == "no"
    assert verdict(0.005, 0.01) == "within noise"
    assert verdict(0.005, None) == "yes"


def test_claims_judge_differences_against_the_isoflop_noise():
    def rec(budget, family, params, loss, tags=("isoflop",)):
        return {
            "run_id": f"{budget}-{family}-{params}",
            "budget": budget,
            "family": family,
            "params": params,
            "val_loss": loss,
            "tags": list(tags),
            "forward_flops_per_token": params * 2.0,
            "shape": {"d_model": 64, "n_layers": params // 1000},
        }

    records = []
    for fam, shift in (("dense", 0.0), ("mod", -0.1)):  # MoD 0.1 better everywhere; curves have small wiggles
        for i, p in enumerate((1000, 2000, 4000, 8000, 16000)):
            wiggle = 0.004 * (-1) ** i
            records.append(rec(1e12, fam, p, 2.0 + 0.1 * (math.log2(p / 4000)) ** 2 + shift + wiggle))
    claims, noise = build_claims(records, None, [1e12])
    assert noise is not None and 0 < noise < 0.02
    by_id = {c.id: c for c in claims}
    assert by_id["isoflop@1e12"].holds == "yes"
    assert by_id["capacity_12.5_best"].holds == "n/a"  # no variant runs here


def test_amod_vs_learned_is_judged_on_the_two_variant_runs():
    def variant(key, loss, causal=None):
        return {"run_id": key, "tags": [f"variant:{key}"], "val_loss": loss, "val_loss_causal": causal, "params": 1000}

    claims, _ = build_claims([variant("mod", 2.00), variant("amod", 1.90, 1.95)], None, [])
    row = {c.id: c for c in claims}["amod_vs_learned"]
    assert row.holds == "yes" and "A-MoD" in row.ours and "1.9500" in row.ours
    claims, _ = build_claims([variant("mod", 2.00), variant("amod", 2.10)], None, [])
    assert {c.id: c for c in claims}["amod_vs_learned"].holds == "no"
    claims, _ = build_claims([variant("mod", 2.00)], None, [])
    assert {c.id: c for c in claims}["amod_vs_learned"].holds == "n/a"
