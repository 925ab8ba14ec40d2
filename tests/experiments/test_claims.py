"""Claims: verdicts against the noise, and the noise measured from the isoFLOP curves."""

import math

from modlm.experiments.claims import build_claims, expected_claim_ids, verdict


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


def _variant(key, loss, fwd=1.0e6, noop=None):
    rec = {
        "run_id": f"v-{key}",
        "val_loss": loss,
        "tags": [f"variant:{key}"],
        "forward_flops_per_token": fwd,
        "shape": {"d_model": 16, "n_layers": 2},
    }
    if noop is not None:
        rec["router_curve"] = {"step": [10, 20], "L0/noop_frac": [0.4, noop], "L1/noop_frac": [0.4, noop]}
    return rec


def test_mode_and_early_exit_claims_on_synthetic_records():
    records = [
        _variant("dense", 2.00, 1.0e6),
        _variant("moe", 1.98, 1.01e6),
        _variant("moe-c0.5", 1.96, 0.7e6),
        _variant("mode-c0.5", 1.91, 0.7e6, noop=0.52),
        _variant("moe-c0.25", 2.02, 0.55e6),
        _variant("mode-c0.25", 2.03, 0.55e6, noop=0.76),  # worse than MoE at 0.25: a 'no'
        _variant("mode-staged", 1.95, 0.6e6),
    ]
    analysis = {
        "early_exit": {
            "n_sequences": 8,
            "mod_flop_fraction": 0.62,
            "mod_val_loss": 1.90,
            "threshold": 0.3,
            "early_exit_flop_fraction": 0.63,
            "early_exit_val_loss": 2.10,
            "early_exit_full_val_loss": 1.97,
            "early_exit_full_flop_fraction": 1.2,
        }
    }
    claims, noise = build_claims(records, analysis, [1e12])
    assert noise is None  # no isoFLOP grid: verdicts by sign alone
    by_id = {c.id: c for c in claims}
    assert [c.id for c in claims] == expected_claim_ids([1e12])
    assert by_id["mode_vs_moe@0.5"].holds == "yes" and by_id["mode_vs_moe@0.25"].holds == "no"
    assert "MoDE 0.9550 (loss 1.9100), 0.70x dense FLOPs/forward" in by_id["mode_vs_moe@0.5"].ours
    assert "no-op share at the end 0.520" in by_id["mode_vs_moe@0.5"].ours
    assert by_id["mode_vs_dense@0.5"].holds == "yes" and by_id["mode_vs_dense@0.25"].holds == "no"
    assert by_id["staged_vs_moe"].holds == "yes"
    assert by_id["staged_vs_integrated"].holds == "no"  # integrated 1.91 beats staged 1.95
    assert by_id["mod_vs_early_exit"].holds == "yes" and "at 0.630 (threshold 0.3000" in by_id["mod_vs_early_exit"].ours
    assert "could not get down" not in by_id["mod_vs_early_exit"].ours
    analysis["early_exit"]["early_exit_flop_fraction"] = 0.93  # the target was out of reach
    late = {c.id: c for c in build_claims(records, analysis, [1e12])[0]}["mod_vs_early_exit"]
    assert "could not get down to MoD's FLOPs" in late.ours
    assert all(c.section.startswith(("7.", "8.")) for c in claims if c.id.startswith(("mode", "staged", "mod_vs_e")))
    # nothing run: every new row says so
    empty = {c.id: c for c in build_claims([], None, [1e12])[0]}
    for cid in ("mode_vs_moe@0.5", "staged_vs_integrated", "mod_vs_early_exit"):
        assert (empty[cid].ours, empty[cid].holds) == ("not run", "n/a")


def test_mode_claims_judge_against_the_noise():
    records = [_variant("moe-c0.5", 2.000), _variant("mode-c0.5", 1.995)]
    records += [
        {
            "run_id": f"iso-{p}",
            "budget": 1e12,
            "family": "dense",
            "params": p,
            "val_loss": 2.0 + 0.1 * math.log2(p / 4000) ** 2 + 0.01 * (-1) ** i,
            "tags": ["isoflop"],
            "forward_flops_per_token": 2.0 * p,
            "shape": {"d_model": 64, "n_layers": 4},
        }
        for i, p in enumerate((1000, 2000, 4000, 8000, 16000))
    ]
    by_id = {c.id: c for c in build_claims(records, None, [1e12])[0]}
    assert by_id["mode_vs_moe@0.5"].holds == "within noise"
