"""`modlm reproduce`: a tiny end-to-end reproduction writes a report with every claim row."""

import json

import pytest

from modlm.experiments.claims import NOT_BRACKETED, build_claims, expected_claim_ids
from modlm.experiments.isoflop import format_budget
from modlm.experiments.report import CLAIMS_FILE, REPORT_FILE, tagged_records
from modlm.experiments.reproduce import run_reproduction
from modlm.experiments.scales import SCALES


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
