"""The report: every claim has a row, even before any run has finished."""

import json

from modlm.experiments.claims import expected_claim_ids
from modlm.experiments.report import CLAIMS_FILE
from modlm.experiments.reproduce import run_reproduction
from modlm.experiments.scales import SCALES


def test_report_of_missing_runs_still_lists_every_claim(tmp_path, make_corpus):
    scale = SCALES["tiny"]
    settings = scale.settings.replace(
        data=make_corpus(seed=1, paragraphs=400, words=50), cache_dir=str(tmp_path / "cache")
    )
    run_reproduction(scale, tmp_path / "empty", tmp_path / "rep", settings, command="x", report_only=True)
    claims = json.loads((tmp_path / "rep" / CLAIMS_FILE).read_text())["claims"]
    assert [c["id"] for c in claims] == expected_claim_ids(scale.budgets)
    assert all(c["holds"] == "n/a" for c in claims)
