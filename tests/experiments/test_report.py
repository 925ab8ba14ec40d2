"""The report: every claim has a row, even before any run has finished."""

import json

import pytest

from modlm.experiments.claims import expected_claim_ids
from modlm.experiments.report import CLAIMS_FILE, write_report
from modlm.experiments.reproduce import run_reproduction
from modlm.experiments.scales import SCALES


def test_report_of_missing_runs_still_lists_every_claim(tmp_path):
    scale = SCALES["tiny"]
    (tmp_path / "empty").mkdir()
    write_report(tmp_path / "empty", tmp_path / "rep", scale, command="x")
    claims = json.loads((tmp_path / "rep" / CLAIMS_FILE).read_text())["claims"]
    assert [c["id"] for c in claims] == expected_claim_ids(scale.budgets)
    assert all(c["holds"] == "n/a" for c in claims)


def test_report_only_refuses_a_results_dir_without_runs(tmp_path):
    # "0 of 16 claims hold" from no runs at all would read like a result.
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'} has no finished runs"):
        run_reproduction("tiny", tmp_path / "empty", tmp_path / "rep", command="x", report_only=True)
    assert not (tmp_path / "rep").exists()
