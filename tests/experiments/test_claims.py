"""Claims: verdicts against 2 seed sigmas; isoFLOP verdicts only between bracketed optima."""

import math

from modlm.experiments.claims import NOT_BRACKETED, build_claims, noise_summary, verdict


def test_verdicts_need_two_sigma():
    assert verdict(0.05, 0.01) == "yes"
    assert verdict(-0.05, 0.01) == "no"
    assert verdict(0.015, 0.01) == "within noise"  # beyond 1 sigma, not beyond 2
    assert verdict(0.005, None) == "yes"


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
    two = by_id["isoflop@2e12"].as_dict()
    assert two["holds"] == NOT_BRACKETED and not two["mod_optimum"]["bracketed"]
    assert by_id["capacity_12.5_best"].holds == "n/a"  # no variant runs here
