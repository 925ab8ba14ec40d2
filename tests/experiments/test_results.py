"""The results folder: records are appended atomically, and a line torn by a crash is ignored."""

from modlm.experiments.results import RUNS_FILE, append_result, read_results


def test_torn_last_line_is_ignored_and_next_append_starts_a_new_line(tmp_path):
    append_result(tmp_path, {"run_id": "a", "val_loss": 1.0})
    with open(tmp_path / RUNS_FILE, "a") as f:
        f.write('{"run_id": "b", "val_lo')  # a crash mid-write
    assert set(read_results(tmp_path)) == {"a"}
    append_result(tmp_path, {"run_id": "c", "val_loss": 3.0})
    assert set(read_results(tmp_path)) == {"a", "c"}
