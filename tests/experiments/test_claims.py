"""Claims: verdicts against 2 seed sigmas; isoFLOP verdicts only between bracketed optima."""

import math

from modlm.experiments.claims import NOT_BRACKETED, build_claims, expected_claim_ids, noise_summary, verdict


def test_verdicts_need_two_sigma():
    assert verdict(0.05, 0.01) == "yes"
    assert verdict(-0.05, 0.01) == "no"
    assert verdict(0.015, 0.01) == "within noise"  # beyond 1 sigma, not beyond 2
    assert verdict(0.005, None) == "yes"


def test_claim_ids_are_stable_and_every_claim_has_a_row_without_runs():
    """claims.json's ids are keys other tools read: a row per claim, in this order, run or not."""
    claims, _ = build_claims([], None, [1e12, 1e14])
    assert [c.id for c in claims] == expected_claim_ids([1e12, 1e14])
    assert all((c.ours, c.holds) == ("not run", "n/a") for c in claims)
    assert expected_claim_ids([1e12, 1e14]) == [
        "isoflop@1e12",
        "isoflop@1e14",
        "optimal_params",
        "forward_flops_ratio",
        "parity_fewer_flops",
        "capacity_12.5_best",
        "every_other_vs_every",
        "learned_vs_random@0.125",
        "learned_vs_random@0.5",
        "expert_vs_token_choice",
        "predictor_accuracy",
        "causal_eval_predictor",
        "causal_eval_aux-loss",
        "aux_loss_cost",
        "depth_varies",
        "depth_entropy",
        "mode_vs_moe@0.5",
        "mode_vs_moe@0.25",
        "mode_vs_dense@0.5",
        "mode_vs_dense@0.25",
        "staged_vs_moe",
        "staged_vs_integrated",
        "mod_vs_early_exit",
        "amod_vs_learned",
        "keys_kept_vs_mod",
    ]


def _rec(budget, family, d_model, params, loss, seed=0, tags=("isoflop",)):
    return {
        "run_id": f"{budget}-{family}-{params}-s{seed}",
        "budget": budget,
        "family": family,
        "params": params,
        "val_loss": loss,
        "seed": seed,
        "lr": 1e-3,
        "tags": list(tags),
        "forward_flops_per_token": params * 2.0,
        "shape": {"d_model": d_model, "n_layers": 2},
    }


def test_isoflop_claims_judge_fitted_optima_against_the_seed_noise():
    records = []
    wobble = (0.0, 0.004, -0.004)  # seed sigma 0.004
    for fam, shift in (("dense", 0.0), ("mod", -0.1)):  # MoD 0.1 better: 25 sigma
        for i, p in enumerate((1000, 2000, 4000, 8000, 16000)):
            for s in (0, 1, 2) if i in (1, 2, 3) else (0,):
                loss = 2.0 + 0.1 * (math.log2(p / 4000)) ** 2 + shift + wobble[s]
                records.append(_rec(1e12, fam, 16 * (i + 1), p, loss, seed=s))
        # at 2e12 both optima sit at the smallest shape: not bracketed, no verdict
        for i, p in enumerate((1000, 2000, 4000)):
            records.append(_rec(2e12, fam, 16 * (i + 1), p, 2.0 + 0.1 * i + shift))
    claims, noise = build_claims(records, None, [1e12, 2e12])
    assert noise is not None and math.isclose(noise, 0.004, rel_tol=1e-9)
    assert noise_summary(records) == {"method": "seeds", "sigma": noise, "n_seeds": 3}
    by_id = {c.id: c for c in claims}
    one = by_id["isoflop@1e12"].as_dict()
    assert one["holds"] == "yes" and one["budget"] == 1e12
    assert one["dense_optimum"]["bracketed"] and one["dense_optimum"]["shape"] == "d48L2"
    assert math.isclose(one["dense_optimum"]["params"], 4000, rel_tol=1e-6)  # the parabola's vertex
    assert math.isclose(one["difference_sigma"], 0.1 / 0.004, rel_tol=1e-6)
    # the best measured means give the same difference here (the vertex is a measured shape)
    assert math.isclose(one["measured_difference_sigma"], 0.1 / 0.004, rel_tol=1e-6)
    assert "best measured: -5.00%, +25.0 sigma" in one["ours"]
    two = by_id["isoflop@2e12"].as_dict()
    assert two["holds"] == NOT_BRACKETED and not two["mod_optimum"]["bracketed"]
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
    # three seeds of one dense shape scatter by 0.01: the 0.005 difference is within 2 sigma
    records += [_rec(1e12, "dense", 48, 4000, 2.0 + w, seed=s) for s, w in enumerate((0.0, 0.01, -0.01))]
    by_id = {c.id: c for c in build_claims(records, None, [1e12])[0]}
    assert by_id["mode_vs_moe@0.5"].holds == "within noise"


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


def test_keys_kept_vs_the_papers_rule_is_one_sided_on_the_two_variant_runs():
    """MoD's rule holds unless keeping skipped tokens' keys trains better beyond the seed noise."""

    def variant(key, loss, causal=None):
        return {"run_id": key, "tags": [f"variant:{key}"], "val_loss": loss, "val_loss_causal": causal, "params": 1000}

    noise = [_rec(1e12, "dense", 48, 4000, 2.0 + w, seed=s) for s, w in enumerate((0.0, 0.01, -0.01))]

    def row(mod, kept, causal=None):
        claims, _ = build_claims(noise + [variant("mod", mod), variant("keys-kept", kept, causal)], None, [1e12])
        return {c.id: c for c in claims}["keys_kept_vs_mod"]

    better = row(2.00, 2.10, 2.12)
    assert better.holds == "yes" and "keys kept 2.1000" in better.ours and "causal routing 2.1200" in better.ours
    assert row(2.00, 1.995).holds == "yes"  # within noise: no worse
    worse = row(2.00, 1.90)
    assert worse.holds == "no" and worse.why_not
    claims, _ = build_claims([variant("mod", 2.00)], None, [])
    assert {c.id: c for c in claims}["keys_kept_vs_mod"].holds == "n/a"


def test_the_aux_loss_cost_is_one_sided():
    """'Costs only a little': an aux-loss run that is better costs nothing; one worse beyond noise fails."""
    from modlm.experiments.claims import _causal_claims

    def rec(key, loss):
        return {"tags": [f"variant:{key}"], "val_loss": loss, "val_loss_causal": loss, "overrides": {"capacity": 0.125}}

    def holds(aux_loss):
        claims = _causal_claims([rec("mod", 2.0), rec("aux-loss", aux_loss)], 0.01, "seed sigma 0.0100")
        return next(c for c in claims if c.id == "aux_loss_cost")

    assert holds(1.90).holds == "yes" and "no cost" in holds(1.90).ours
    assert holds(2.005).holds == "yes"  # within 0.5%
    assert holds(2.10).holds == "no"
