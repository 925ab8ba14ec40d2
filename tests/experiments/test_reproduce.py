"""`modlm reproduce`: a tiny end-to-end reproduction writes a report with every claim row."""

import json

import pytest

from modlm.experiments.claims import NOT_BRACKETED, build_claims, expected_claim_ids
from modlm.experiments.isoflop import format_budget
from modlm.experiments.report import CLAIMS_FILE, REPORT_FILE, tagged_records
from modlm.experiments.reproduce import run_reproduction
from modlm.experiments.scales import SCALES, plan_reproduction


def _table_rows(md: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| claim")]


@pytest.mark.slow
def test_tiny_reproduction_writes_a_report_with_every_claim(tmp_path, make_corpus):
    scale = SCALES["tiny"]
    settings = scale.settings.replace(
        data=make_corpus(seed=1, paragraphs=400, words=50), cache_dir=str(tmp_path / "cache"), device="cpu"
    )
    out = run_reproduction(
        scale, tmp_path / "res", tmp_path / "report", settings, command="modlm reproduce --scale tiny", progress=False
    )
    assert out["complete"]
    md = (tmp_path / "report" / REPORT_FILE).read_text()
    doc = json.loads((tmp_path / "report" / CLAIMS_FILE).read_text())
    claims = doc["claims"]
    assert [c["id"] for c in claims] == expected_claim_ids(scale.budgets)
    assert doc["budgets"] == list(scale.budgets) and doc["noise"]["method"] == "seeds"
    assert set(doc["lrs"]) == {"dense", "mod"}  # each family's own learning rate
    for b in scale.budgets:
        iso = next(c for c in claims if c["id"] == f"isoflop@{format_budget(b)}")
        assert iso["budget"] == b and {"difference_sigma", "dense_optimum", "mod_optimum"} <= set(iso)
        assert {"shape", "params", "loss", "bracketed"} <= set(iso["dense_optimum"])
    rows = _table_rows(md)
    for c in claims:
        # every claim was measured; an isoFLOP one may be left undecided (not bracketed)
        assert c["holds"] in ("yes", "no", "within noise", "partly", NOT_BRACKETED), c
        assert c["ours"] != "not run"
        # in its section's table as: claim | paper | ours | holds?
        assert any(r.startswith(f"| {c['claim']} | ") and r.rstrip().endswith(f"| {c['holds']} |") for r in rows), c[
            "id"
        ]
    assert "modlm reproduce --scale tiny" in md
    for png in (
        "isoflop.png",
        "loss_vs_flops.png",
        "variants.png",
        "router_accuracy.png",
        "routing_heatmap.png",
        "depth_entropy.png",
    ):
        assert (tmp_path / "report" / png).stat().st_size > 1000
        assert f"]({png})" in md
    # the claims are a function of the results folder alone (runs.jsonl, plan.json, analysis.json)
    records = tagged_records(tmp_path / "res")  # runs.jsonl with plan.json's tags
    analysis = json.loads((tmp_path / "res" / "analysis.json").read_text())
    again, _ = build_claims(records, analysis, scale.budgets)
    assert [(c.id, c.ours, c.holds) for c in again] == [(c["id"], c["ours"], c["holds"]) for c in claims]


def test_gpu_scale_fits_eight_minutes_at_its_assumed_speed_even_with_every_extension():
    # Planner only (no GPU): the expected plan, plus every curve and lr sweep using all its
    # extensions on its costlier side, at the scale's assumed speed.
    from modlm.experiments.isoflop import plan_run
    from modlm.experiments.reproduce import assumed_seconds
    from modlm.experiments.study import first_window

    scale = SCALES["gpu"]
    s = scale.settings
    assert min(scale.budgets) >= 1e15 and s.seq_len >= 256 and s.dtype in ("auto", "bf16")
    assert len(scale.seeds) >= 3 and len(scale.lrs) >= 3

    def secs(runs):
        return assumed_seconds(runs, s, scale.assumed_flops_per_s, scale.assumed_step_s)

    runs = plan_reproduction(scale)  # the planner no longer refuses the every-block variant's step count
    design = scale.design()
    extra = 0.0
    for b in scale.budgets:
        for fam in design.families:
            w = first_window(design, b, fam, s)
            sides = []
            for rungs in (range(w[0] - 1, -1, -1), range(w[-1] + 1, len(design.ladder))):
                side = []
                for i in list(rungs)[: design.max_extensions]:
                    try:
                        side.append(plan_run(b, fam, design.ladder[i], s))
                    except ValueError:
                        break
                sides.append(secs(side))
            extra += max(sides)
    lr_runs = [r for r in runs if "lr" in r.tags]
    extra += design.max_extensions * max(secs([r]) for r in lr_runs) * len(design.families)
    assert secs(runs) + extra <= 8 * 60, (secs(runs), extra)
