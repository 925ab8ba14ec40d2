"""The benchmarks (modlm.bench, run by ``modlm bench`` and benchmarks/*.py) run end to end on a tiny model and report what they promise.

Their numbers are not checked here (timings belong to benchmarks, never to tests); what is
checked is that each script runs, prints its JSON line last, and that the quantities that do
not depend on timing are right (routed fractions, ideal speed-ups, parts adding up).
"""

import importlib
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modlm.bench import BENCHMARKS

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    """A benchmark module of modlm.bench by its script name (bench_decode -> modlm.bench.decode)."""
    return importlib.import_module(f"modlm.bench.{name.removeprefix('bench_')}")


def _last_json(capsys):
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1])


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _table(lines, header_start):
    """The rows (split on whitespace) of the table whose header line starts with ``header_start``,
    up to the first blank line (the dashed line under the header skipped)."""
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(header_start)) + 1
    rows = []
    for line in lines[start:]:
        if not line.strip():
            break
        if not set(line.strip()) <= {"-"}:
            rows.append(line.split())
    return rows


def test_bench_decode_runs_and_reports(capsys):
    bench = _load("bench_decode")
    res = bench.main(
        [
            "--preset",
            "tiny",
            "--batch-sizes",
            "1",
            "3",
            "--prompt-len",
            "16",
            "--new-tokens",
            "8",
            "--repeats",
            "2",
            "--warmup",
            "0",
            "--calib-rows",
            "8",
            "--no-sync-probe",
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == json.loads(json.dumps(res))
    # Each speed-up is the median of per-run ratios of the measured tokens/s, run by run.
    assert set(res["speedup"]) == {"1", "3"} and res["speedup_b1"] == res["speedup"]["1"]
    assert res["speedup_b16"] is None  # batch 16 was not run
    for B in ("1", "3"):
        runs = res["runs_tokens_per_s"][B]
        assert len(runs["mod"]) == len(runs["dense"]) == 2  # --repeats, no warm-up run recorded
        assert res["speedup_runs"][B] == [m / d for m, d in zip(runs["mod"], runs["dense"])]
        assert res["speedup"][B] == statistics.median(res["speedup_runs"][B])
        assert res["tokens_per_s"][B] == {name: statistics.median(runs[name]) for name in ("mod", "dense")}
    # The routing table: the calibration sample (8 rows x 24 tokens) routes exactly the target,
    # 24 of 192 tokens per layer; the held-out column is the JSON's routed fraction per layer.
    routing = _table(lines, "layer")
    assert [int(r[0]) for r in routing] == res["routed_layers"] == [1, 3]
    for layer, _, calib, held in routing:
        assert float(calib) == 0.125
        assert held == f"{res['routed_fraction_per_layer'][layer]:.3f}"
    per_layer = res["routed_fraction_per_layer"].values()
    assert res["routed_fraction"] == pytest.approx(sum(per_layer) / len(per_layer))
    assert abs(res["routed_fraction"] - 0.125) < 0.1  # calibrated on one sample, measured on another
    # The speed-up table says what the JSON says.
    for row, B in zip(_table(lines, "batch"), ("1", "3"), strict=True):
        tps = res["tokens_per_s"][B]
        assert row == [
            B,
            f"{tps['mod']:.1f}",
            f"{tps['dense']:.1f}",
            f"{res['speedup'][B]:.2f}x",
            f"{res['routed_fraction_decode'][B]:.3f}",
            f"{res['ideal_speedup_flops'][B]:.2f}x",
            f"{res['ideal_speedup_bytes'][B]:.2f}x",
        ]
    # The ideal speed-ups depend only on shapes and routed fractions: MoD saves, but less than
    # skipping every routed block would.
    cfg_layers = 4
    for B in ("1", "3"):
        assert 1.0 < res["ideal_speedup_flops"][B] < cfg_layers / 2
        assert 1.0 <= res["ideal_speedup_bytes"][B] < cfg_layers / 2


def test_bench_decode_ideal_bytes_reads_weights_whenever_any_row_routes():
    bench = _load("bench_decode")
    from modlm.config import ModelConfig

    cfg = ModelConfig.from_name("base")
    frac = {i: 0.125 for i in cfg.routed_layers}
    W = bench.block_params(cfg) * 4
    one_row = bench.bytes_per_step(cfg, frac, 1, 128, 256, 4)
    many = bench.bytes_per_step(cfg, frac, 16, 128, 256, 4)
    # weights only (no cache) to check the 1 - (1 - f)^B rule
    none = bench.bytes_per_step(cfg, frac, 16, 0, 1, 4)
    routed, dense = len(cfg.routed_layers), cfg.n_layers - len(cfg.routed_layers)
    assert none == pytest.approx(dense * W + routed * (1 - 0.875**16) * W, rel=1e-3)
    assert many > one_row


def test_profile_decode_parts_add_up(capsys):
    prof = _load("profile_decode")
    res = prof.main(["--preset", "tiny", "--batch-size", "2", "--prompt-len", "16", "--steps", "6"])
    assert _last_json(capsys)["bench"] == "profile_decode"
    parts = res["parts"]
    # every decode step calls each dense block once, and each routed block once (some kind)
    assert parts["dense/dense block"]["calls_per_step"] == 4
    assert parts["mod/dense block"]["calls_per_step"] == 2
    routed_calls = sum(v["calls_per_step"] for k, v in parts.items() if k.startswith("mod/routed:"))
    assert routed_calls == 2
    for m in ("mod", "dense"):
        assert 0 < res["rest_ms"][m] < res["step_ms"][m]
    assert res["speedup"] == res["step_ms"]["dense"] / res["step_ms"]["mod"]
    all_rows = parts.get("mod/routed: all rows", {}).get("calls_per_step", 0.0)
    some = parts.get("mod/routed: some rows", {}).get("calls_per_step", 0.0)
    # batch 2: an "all rows" call runs 2 rows, a "some rows" call 1; 2 routed blocks x 2 rows per step
    assert res["routed_fraction"] == pytest.approx((2 * all_rows + some) / (2 * 2))


def test_bench_train_runs_and_reports(capsys):
    from modlm.config import ModelConfig
    from modlm.flops import format_flops, train_flops

    bench = _load("bench_train")
    res = bench.main(
        ["--preset", "tiny", "--batch-size", "2", "--seq-len", "32", "--steps", "2", "--warmup", "0", "--threads", "1"]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == json.loads(json.dumps(res))
    # FLOPs are counted, not measured: the MoD model's and its dense twin's at B=2, T=32.
    cfg = ModelConfig.from_name("tiny")
    assert res["mod_train_flops"] == train_flops(cfg, 32, 2)
    assert res["dense_train_flops"] == train_flops(cfg.dense_twin(), 32, 2)
    assert res["flop_ratio"] == res["mod_train_flops"] / res["dense_train_flops"] and 0 < res["flop_ratio"] < 1
    # The ratios are those of the measured step times.
    for name in ("mod", "dense"):
        assert len(res[f"{name}_step_times_s"]) == 2
        assert res[f"{name}_step_s"] == statistics.median(res[f"{name}_step_times_s"])
        assert res[f"{name}_tokens_per_s"] == 2 * 32 / res[f"{name}_step_s"]
    assert res["time_ratio"] == res["mod_step_s"] / res["dense_step_s"]
    assert res["overhead"] == res["time_ratio"] / res["flop_ratio"]
    pairs = [m / d for m, d in zip(res["mod_step_times_s"], res["dense_step_times_s"])]
    assert res["paired_time_ratio"] == statistics.median(pairs)
    assert res["cpu_overhead"] == res["cpu_time_ratio"] / res["flop_ratio"]
    # The table's FLOPs columns say what the JSON says.
    table = {row[0]: row for row in _table(lines, "model")}
    assert set(table) == {"MoD", "dense"}
    assert " ".join(table["MoD"][-4:-2]) == format_flops(res["mod_train_flops"])
    assert " ".join(table["dense"][-4:-2]) == format_flops(res["dense_train_flops"])


def test_bench_kernels_runs_and_reports(capsys):
    from modlm.kernels import fewrow as kernels

    bench = _load("bench_kernels")
    before = (kernels.MAX_ROWS, kernels.enabled())
    res = bench.main(["--preset", "tiny", "--rows", "1", "3", "--threads", "1", "--blocks", "2", "--iters", "2"])
    assert _last_json(capsys) == json.loads(json.dumps(res))
    assert [(r["threads"], r["rows"]) for r in res["results"]] == [(1, 1), (1, 3)]
    assert all(r["torch_ms"] > 0 for r in res["results"])
    assert all((r["native_ms"] is not None) == kernels.available() for r in res["results"])
    assert (kernels.MAX_ROWS, kernels.enabled()) == before  # settings restored


def test_cli_bench_runs_a_benchmark_and_scripts_are_thin_entry_points(capsys):
    from modlm.cli import main

    assert (
        main(["bench", "kernels", "--preset", "tiny", "--rows", "2", "--threads", "1", "--blocks", "1", "--iters", "1"])
        == 0
    )
    assert _last_json(capsys)["bench"] == "kernels"
    with pytest.raises(SystemExit) as e:
        main(["bench", "kernels", "--rows", "0"])
    assert e.value.code == 2
    assert "modlm bench kernels: error: --rows" in capsys.readouterr().err
    # every benchmark has its script under benchmarks/, and a script is only an entry point
    scripts = {
        "train": "bench_train",
        "decode": "bench_decode",
        "profile-decode": "profile_decode",
        "kernels": "bench_kernels",
        "moe": "bench_moe",
        "adapt": "bench_adapt",
    }
    assert set(scripts) == set(BENCHMARKS)
    for name, script in scripts.items():
        text = (ROOT / "benchmarks" / f"{script}.py").read_text()
        assert f"from modlm.bench.{BENCHMARKS[name][0]} import main" in text
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "--rows" in out.stdout


def test_bench_moe_runs_and_charges_experts_their_real_tokens(capsys):
    bench = _load("bench_moe")
    res = bench.main(
        ["--preset", "tiny", "--seq-len", "32", "--steps", "1", "--warmup", "0", "--experts", "4", "--threads", "1"]
    )
    assert _last_json(capsys) == json.loads(json.dumps(res))
    for key in ("moe_step_s", "mode_step_s", "dense_step_s", "moe_flop_ratio", "mode_flop_ratio"):
        assert res[key] > 0
    for name in ("moe", "mode"):
        assert res[f"{name}_overhead"] == pytest.approx(res[f"{name}_time_ratio"] / res[f"{name}_flop_ratio"])
    # top-2 of 4 same-size experts doubles the MLP's FLOPs; half the MoDE choices are free no-ops
    assert res["moe_flop_ratio"] > res["mode_flop_ratio"] and res["moe_flop_ratio"] > 1.0
    assert 0 < res["mode_noop_frac"] < 1


def test_bench_decode_counts_host_syncs_per_decoded_token_on_cpu():
    """Off CUDA nothing waits on a device: the count is the structural one (a decision per
    routed block + the sampled tokens per step), shared by the step's rows."""
    from modlm.config import ModelConfig
    from modlm.model.transformer import MoDTransformer

    bench = _load("bench_decode")
    mod = MoDTransformer(ModelConfig.from_name("tiny"))
    probe = bench.sync_probe(mod, 2, torch.device("cpu"), step_s=1.0)
    assert probe["measured_syncs_per_step"] is None
    assert probe["syncs_per_step"] == len(mod.config.routed_layers) + 1
    assert probe["syncs_per_token"] == probe["syncs_per_step"] / 2


def test_bench_train_compile_figures_are_ratios_of_the_measured_steps():
    """--compile's fields, from timings (no compile here: the compiled steps are exercised by the
    trainer's compile test): speed-ups are eager / compiled, the matmul fractions are counted
    FLOP/s over the plain matmul's; the largest GEMM is the biggest linear over all tokens."""
    from types import SimpleNamespace

    from modlm.config import ModelConfig
    from modlm.model.transformer import MoDTransformer

    bench = _load("bench_train")
    cfg = ModelConfig.from_name("tiny")
    assert bench.largest_gemm(MoDTransformer(cfg), 64) == (64, cfg.d_model, 2 * cfg.d_mlp)
    step = lambda s: SimpleNamespace(median=s, times=[s])  # noqa: E731
    matmul = bench.MatmulTimer((4, 8, 16), torch.device("cpu"))
    matmul.times = [2 * 4 * 8 * 16 / 1e9]  # exactly 1 GFLOP/s
    fig = bench.compile_figures(step(2.0), step(3.0), step(1.0), step(2.0), matmul, 4e9, 6e9, 4 / 6)
    assert fig["compile_speedup_mod"] == 2.0 and fig["compile_speedup_dense"] == 1.5
    assert fig["matmul_gflops"] == pytest.approx(1.0)
    assert fig["mod_frac_of_matmul"] == pytest.approx(4.0) and fig["dense_frac_of_matmul"] == pytest.approx(3.0)
    assert fig["eager_overhead"] == pytest.approx((2 / 3) / (4 / 6))
    assert bench.compile_figures(step(1), step(1), step(1), step(1), None, 1, 1, 1) == {}


def test_bench_adapt_runs_on_a_tiny_random_llama_and_reports(capsys):
    bench = _load("bench_adapt")
    args = ["--tiny", "--new-tokens", "6", "--prompt-len", "8", "--rounds", "1", "--warmup", "0"]
    res = bench.main([*args, "--adapt-steps", "3", "--eval-tokens", "128"])
    assert _last_json(capsys) == json.loads(json.dumps(res))
    keys = ("hf_tok_s", "dense_tok_s", "routed_tok_s", "routed_compute_fraction", "ppl_dense", "ppl_routed")
    assert all(res[k] > 0 for k in keys)
    assert res["parity_max_abs_diff"] <= 1e-4  # the converted model is the original
    # the adapted model routes layers 1 and 2 of 4 at capacity 0.25: it keeps less than all the compute
    assert res["routed_layers"] == [1, 2] and res["routed_compute_fraction"] < 1.0
