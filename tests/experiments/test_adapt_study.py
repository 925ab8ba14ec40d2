"""The adaptation study's command writes into a run folder unless told otherwise, and its report
steps work on a made-up result (the study itself needs SmolLM2 and ~40 min)."""

import json
from pathlib import Path

from modlm.cli import build_parser
from modlm.experiments.adapt_study import (
    METHODS,
    REPORT_DIR,
    AdaptStudyConfig,
    choose_decode_model,
    write_report,
)


def test_adapt_study_defaults_to_a_run_folder_not_the_repository_docs():
    args = build_parser().parse_args(["adapt-study"])
    assert args.report_dir == REPORT_DIR == "runs/adapt-study"
    assert build_parser().parse_args(["adapt-study", "--report-dir", "x"]).report_dir == "x"
    assert "docs/results" not in build_parser().epilog


def test_every_adapt_option_shows_its_default():
    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("adapt", "adapt-study"):
        for action in subs[name]._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and "default" in action.help, (name, action.dest)


def test_the_decode_model_and_the_report(tmp_path):
    adapted = {
        "a c=0.5": (12.0, 0.8, Path("a")),
        "b c=0.25": (14.0, 0.6, Path("b")),
        "c c=0.25": (40.0, 0.5, Path("c")),
    }
    assert choose_decode_model(adapted, original_ppl=10.0) == "b c=0.25"  # least compute within 1.5x
    assert choose_decode_model(adapted, original_ppl=5.0) == "a c=0.5"  # none within: the lowest perplexity
    cfg = AdaptStudyConfig(capacities=(0.5,))
    rows = [{"method": "original", "capacity": None, "ppl": 10.0, "fraction": 1.0}]
    rows += [{"method": m, "capacity": 0.5, "ppl": 11.0 + i, "fraction": 0.8} for i, m in enumerate(METHODS[1:])]
    result = {
        "model": "tiny",
        "config": {**cfg.__dict__, "capacities": [0.5]},
        "routed_layers": [1, 2],
        "block_influence": {0: 0.5, 1: 0.1, 2: 0.2, 3: 0.4},
        "rows": rows,
        "decode": {
            "best": "x",
            "tok_s": {"hf": 10.0, "dense": 20.0, "routed": 25.0},
            "routed_decode_fraction": 0.8,
            "ppl": 12.0,
        },
        "threads": 1,
        "wall_s": 60.0,
    }
    write_report(result, tmp_path / "report")
    assert json.loads((tmp_path / "report" / "adapt.json").read_text())["rows"] == rows
    text = (tmp_path / "report" / "ADAPT.md").read_text()
    assert "| layer removal | 0.5 | 0.800 | 11.00 |" in text and (tmp_path / "report" / "adapt.png").is_file()
