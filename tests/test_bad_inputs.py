"""Every mistake gets one line: bad inputs across the CLI and the API, one row each.

A CLI row runs ``modlm.cli.main`` in-process and asserts a non-zero exit, no traceback, and ONE
line on stderr that says "error:" and names the offending flag or value. An API row asserts the
exception type and a one-line message naming the value.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from modlm.cli import main
from modlm.config import ModelConfig
from modlm.model.transformer import MoDTransformer

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the mistake is asking for a GPU this machine lacks")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Checkpoints (MoD, dense, random router) and bad files, made once for the module."""
    from modlm.training.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("bad_inputs")
    out = {"root": str(root)}
    for name, cfg in {
        "ckpt": ModelConfig.from_name("tiny"),
        "dense": ModelConfig.from_name("tiny-dense"),
        "random": ModelConfig.from_name("tiny", router="random"),
    }.items():
        torch.manual_seed(0)
        out[name] = str(save_checkpoint(root / name, MoDTransformer(cfg), cfg))
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00 not text\n")
    (root / "a_file").write_text("I am a file, not a directory\n")
    (root / "empty").mkdir()
    out.update(binary=str(root / "binary.txt"), file=str(root / "a_file"), empty=str(root / "empty"))
    out["missing"] = str(root / "no" / "such" / "path")
    return out


def _fill(items, files):
    return [str(x).format(**files) if isinstance(x, str) else x for x in items]


# (id, argv, fragment the one line must contain). {name} is a path from the ``files`` fixture.
TRAIN = ["train", "--model", "tiny", "--seq-len", "64", "--max-steps", "1", "--no-progress"]
GEN = ["generate", "--ckpt", "{ckpt}", "--prompt", "Hi", "--max-new-tokens", "4"]
CLI_CASES = [
    # --- train
    ("train-batch-size-not-int", ["train", "--batch-size", "abc"], "--batch-size"),
    ("train-batch-size-zero", ["train", "--batch-size", "0"], "batch_size=0"),
    ("train-lr-nan", ["train", "--lr", "nan"], "lr=nan"),
    ("train-lr-negative", ["train", "--lr", "-1"], "lr=-1"),
    ("train-max-steps-float", ["train", "--max-steps", "1.5"], "'1.5'"),
    ("train-grad-accum-zero", ["train", "--grad-accum", "0"], "grad_accum=0"),
    ("train-unknown-preset", ["train", "--model", "giant"], "giant"),
    ("train-unknown-router", ["train", "--router", "magic"], "magic"),
    ("train-unknown-dtype", ["train", "--dtype", "fp8"], "fp8"),
    ("train-capacity-above-one", ["train", "--capacity", "1.5"], "capacity=1.5"),
    # --- MoE / MoDE fields
    ("train-moe-zero-experts", ["train", "--model", "tiny-moe", "--model-arg", "n_experts=0"], "n_experts=0"),
    ("train-moe-top-k-above-experts", ["train", "--model", "tiny-moe", "--model-arg", "n_experts=1"], "moe_top_k=2"),
    ("train-moe-top-k-three", ["train", "--model", "tiny-moe", "--model-arg", "moe_top_k=3"], "moe_top_k=3"),
    (
        "train-moe-capacity-zero",
        ["train", "--model", "tiny-moe", "--model-arg", "moe_capacity_factor=0"],
        "moe_capacity_factor=0",
    ),
    (
        "train-moe-capacity-negative",
        ["train", "--model", "tiny-moe", "--model-arg", "moe_capacity_factor=-1"],
        "moe_capacity_factor=-1",
    ),
    (
        "train-noop-experts-on-moe",
        ["train", "--model", "tiny-moe", "--model-arg", "n_noop_experts=2"],
        "n_noop_experts=2",
    ),
    (
        "train-integrated-without-noop",
        ["train", "--model", "tiny-mode-integrated", "--model-arg", "n_noop_experts=0"],
        "n_noop_experts=0",
    ),
    (
        "train-block-kind-routed",
        ["train", "--model", "tiny", "--model-arg", "block_kind=routed"],
        "block_kind='routed'",
    ),
    ("train-model-arg-no-equals", ["train", "--model-arg", "d_model"], "d_model"),
    ("train-model-arg-unknown-field", ["train", "--model-arg", "colour=1"], "colour"),
    ("train-seq-len-over-context", ["train", "--model", "tiny", "--seq-len", "4096"], "seq_len=4096"),
    ("train-unknown-flag", ["train", "--nonexistent-flag"], "--nonexistent-flag"),
    ("train-data-missing", [*TRAIN, "--data", "{missing}", "--out-dir", "{root}/run-data"], "{missing}"),
    ("train-out-dir-is-a-file", [*TRAIN, "--out-dir", "{file}"], "{file}"),
    ("train-out-dir-under-a-file", [*TRAIN, "--out-dir", "{file}/run"], "{file}"),
    # --- generate
    pytest.param("generate-device-cuda", [*GEN, "--device", "cuda"], "--device='cuda'", marks=NO_CUDA),
    ("generate-device-unknown", [*GEN, "--device", "tpu"], "--device='tpu'"),
    ("generate-seed-overflow", [*GEN, "--seed", str(2**64)], f"seed={2**64}"),
    ("generate-seed-negative", [*GEN, "--seed", "-1"], "seed=-1"),
    ("generate-seed-not-int", [*GEN, "--seed", "lucky"], "'lucky'"),
    ("generate-max-new-tokens-zero", [*GEN, "--max-new-tokens", "0"], "max_new_tokens=0"),
    ("generate-temperature-negative", [*GEN, "--temperature", "-1"], "temperature=-1.0"),
    ("generate-top-k-zero", [*GEN, "--top-k", "0"], "top_k=0"),
    ("generate-top-p-above-one", [*GEN, "--top-p", "2"], "top_p=2.0"),
    ("generate-threads-negative", [*GEN, "--threads", "-1"], "--threads=-1"),
    ("generate-prefill-routing", [*GEN, "--prefill-routing", "random"], "'random'"),
    ("generate-routed-fraction-above-one", [*GEN, "--routed-fraction", "2"], "--routed-fraction=2.0"),
    (
        "generate-routed-fraction-dense",
        ["generate", "--ckpt", "{dense}", "--prompt", "Hi", "--max-new-tokens", "4", "--routed-fraction", "0.5"],
        "nothing to calibrate",
    ),
    (
        "generate-routed-fraction-random-router",
        ["generate", "--ckpt", "{random}", "--prompt", "Hi", "--max-new-tokens", "4", "--routed-fraction", "0.5"],
        "router 'random'",
    ),
    ("generate-stop-two-tokens", [*GEN, "--stop", "ab"], "'ab'"),
    ("generate-prompt-too-long", [*GEN[:-1], "100", "--prompt", "x" * 100], "max_seq_len=128"),
    ("generate-no-prompt", ["generate", "--ckpt", "{ckpt}"], "--prompt"),
    ("generate-no-ckpt", ["generate", "--prompt", "Hi"], "--ckpt"),
    ("generate-ckpt-missing", ["generate", "--ckpt", "{missing}", "--prompt", "Hi"], "{missing}"),
    ("generate-ckpt-is-a-file", ["generate", "--ckpt", "{file}", "--prompt", "Hi"], "{file}"),
    ("generate-ckpt-empty-dir", ["generate", "--ckpt", "{empty}", "--prompt", "Hi"], "{empty}"),
    ("generate-prompts-file-binary", ["generate", "--ckpt", "{ckpt}", "--prompts-file", "{binary}"], "{binary}"),
    ("generate-prompts-file-missing", ["generate", "--ckpt", "{ckpt}", "--prompts-file", "{missing}"], "{missing}"),
    ("generate-prompts-file-is-a-dir", ["generate", "--ckpt", "{ckpt}", "--prompts-file", "{empty}"], "{empty}"),
    # --- flops
    ("flops-seq-len-zero", ["flops", "--seq-len", "0"], "seq_len=0"),
    ("flops-seq-len-negative", ["flops", "--seq-len", "-5"], "seq_len=-5"),
    ("flops-seq-len-beyond-context", ["flops", "--model", "tiny", "--seq-len", "10000"], "seq_len=10000"),
    ("flops-seq-len-not-int", ["flops", "--seq-len", "long"], "'long'"),
    ("flops-capacity", ["flops", "--capacity", "2"], "capacity=2.0"),
    ("flops-unknown-preset", ["flops", "--model", "nope"], "'nope'"),
    ("flops-model-arg", ["flops", "--model-arg", "capacity=0"], "capacity=0"),
    # --- bench
    ("bench-unknown", ["bench", "nope"], "'nope'"),
    ("bench-decode-prompt-len", ["bench", "decode", "--prompt-len", "0"], "--prompt-len=0"),
    ("bench-decode-batch-sizes", ["bench", "decode", "--batch-sizes", "1", "0"], "--batch-sizes=0"),
    ("bench-decode-new-tokens", ["bench", "decode", "--new-tokens", "1"], "--new-tokens=1"),
    ("bench-decode-repeats", ["bench", "decode", "--repeats", "0"], "--repeats=0"),
    ("bench-decode-target-fraction", ["bench", "decode", "--target-fraction", "2"], "--target-fraction=2.0"),
    ("bench-decode-unknown-preset", ["bench", "decode", "--preset", "nope"], "'nope'"),
    ("bench-decode-dense-preset", ["bench", "decode", "--preset", "tiny-dense"], "'tiny-dense'"),
    ("bench-decode-dense-ckpt", ["bench", "decode", "--ckpt", "{dense}"], "{dense}"),
    ("bench-decode-ckpt-missing", ["bench", "decode", "--ckpt", "{missing}"], "{missing}"),
    ("bench-decode-device", ["bench", "decode", "--preset", "tiny", "--device", "tpu"], "--device='tpu'"),
    (
        "bench-decode-too-long",
        ["bench", "decode", "--preset", "tiny", "--prompt-len", "100", "--new-tokens", "100"],
        "max_seq_len=128",
    ),
    ("bench-train-steps", ["bench", "train", "--steps", "0"], "--steps=0"),
    ("bench-train-seq-len", ["bench", "train", "--seq-len", "1"], "--seq-len=1"),
    ("bench-train-dense-preset", ["bench", "train", "--preset", "tiny-dense"], "'tiny-dense'"),
    ("bench-kernels-rows", ["bench", "kernels", "--rows", "4", "0"], "--rows=0"),
    ("bench-kernels-iters", ["bench", "kernels", "--iters", "0"], "--iters=0"),
    ("bench-profile-steps", ["bench", "profile-decode", "--steps", "1"], "--steps=1"),
    # --- isoflop
    ("isoflop-no-budgets", ["isoflop"], "--budgets"),
    ("isoflop-budgets-not-numbers", ["isoflop", "--budgets", "abc"], "'abc'"),
    ("isoflop-budgets-negative", ["isoflop", "--budgets", "1e12,-1"], "'1e12,-1'"),
    ("isoflop-family", ["isoflop", "--budgets", "1e12", "--family", "foo", "--dry-run"], "'foo'"),
    ("isoflop-shapes", ["isoflop", "--budgets", "1e12", "--shapes", "12", "--dry-run"], "'12'"),
    ("isoflop-jobs-zero", ["isoflop", "--budgets", "1e12", "--jobs", "0", "--dry-run"], "--jobs=0"),
    ("isoflop-threads-negative", ["isoflop", "--budgets", "1e12", "--threads", "-1", "--dry-run"], "--threads=-1"),
    ("isoflop-seq-len-zero", ["isoflop", "--budgets", "1e12", "--seq-len", "0", "--dry-run"], "seq_len=0"),
    (
        "isoflop-results-dir-is-a-file",
        ["isoflop", "--budgets", "1e12", "--shapes", "64x2,64x3,64x4", "--family", "mod", "--results-dir", "{file}"],
        "{file}",
    ),
    ("isoflop-one-shape", ["isoflop", "--budgets", "1e12", "--shapes", "64x2", "--dry-run"], "ladder=['d64L2']"),
    ("isoflop-ladder-order", ["isoflop", "--budgets", "1e12", "--shapes", "64x4,64x2,96x4", "--dry-run"], "d64L2"),
    ("isoflop-two-lrs", ["isoflop", "--budgets", "1e12", "--lrs", "1e-3,2e-3", "--dry-run"], "lrs=(0.001, 0.002)"),
    ("isoflop-seeds", ["isoflop", "--budgets", "1e12", "--seeds", "0,x", "--dry-run"], "'0,x'"),
    ("isoflop-tokenizer", ["isoflop", "--budgets", "1e12", "--tokenizer", "bpe:7", "--dry-run"], "'bpe:7'"),
    # --- reproduce
    ("reproduce-unknown-scale", ["reproduce", "--scale", "huge"], "'huge'"),
    (
        "reproduce-report-only-empty",
        ["reproduce", "--scale", "tiny", "--report-only", "--results-dir", "{empty}"],
        "{empty}",
    ),
    (
        "reproduce-report-only-missing",
        ["reproduce", "--scale", "tiny", "--report-only", "--results-dir", "{missing}"],
        "{missing}",
    ),
    ("reproduce-jobs-negative", ["reproduce", "--scale", "tiny", "--dry-run", "--jobs", "-1"], "--jobs=-1"),
    ("reproduce-jobs-zero", ["reproduce", "--scale", "tiny", "--dry-run", "--jobs", "0"], "--jobs=0"),
    ("reproduce-threads-negative", ["reproduce", "--scale", "tiny", "--dry-run", "--threads", "-1"], "--threads=-1"),
    ("reproduce-batch-size-zero", ["reproduce", "--scale", "tiny", "--dry-run", "--batch-size", "0"], "batch_size=0"),
    # --- the command itself
    ("unknown-command", ["nope"], "'nope'"),
]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse ends flag errors this way
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _case_id(case) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


@pytest.mark.parametrize("name,argv,fragment", CLI_CASES, ids=[_case_id(c) for c in CLI_CASES])
def test_cli_mistake_is_one_line(files, capsys, monkeypatch, name, argv, fragment):
    monkeypatch.delenv("MODLM_DEBUG", raising=False)
    monkeypatch.setenv("MODLM_CACHE", os.path.join(files["root"], "cache"))
    rc, out, err = _run(_fill(argv, files), capsys)
    fragment = fragment.format(**files)
    assert rc not in (0, None), (rc, out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "error:" in lines[0] and fragment in lines[0], lines[0]


# --------------------------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> MoDTransformer:
    torch.manual_seed(0)
    return MoDTransformer(ModelConfig.from_name("tiny")).eval()


def _ids(*shape, hi=256, dtype=torch.long):
    return torch.randint(0, hi, shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def _forward(**kw):
    def call(model, files):
        args = {"idx_BT": _ids(2, 8)} | kw
        return model(**{k: (v() if callable(v) else v) for k, v in args.items()})

    return call


def _generate(prompts, **kw):
    def call(model, files):
        from modlm import generate

        return generate(model, prompts() if callable(prompts) else prompts, 4, **kw)

    return call


def _calibrate(tokens, fraction=0.5, dense=False):
    def call(model, files):
        from modlm.inference.calibrate import calibrate_thresholds

        if dense:
            model = MoDTransformer(ModelConfig.from_name("tiny-dense"))
        return calibrate_thresholds(model, tokens() if callable(tokens) else tokens, fraction)

    return call


def _config(**kw):
    return lambda model, files: ModelConfig(**kw)


def _gen_config(**kw):
    def call(model, files):
        from modlm.inference.generate import GenerationConfig

        return GenerationConfig(**kw)

    return call


def _load(path_key):
    def call(model, files):
        from modlm import load_model

        return load_model(files[path_key])

    return call


def _with_targets(t):
    return _forward(targets_BT=t)


def _flops(seq_len):
    def call(model, files):
        from modlm.flops import flops

        return flops(ModelConfig.from_name("tiny"), seq_len)

    return call


def _calibrate_exit(fraction):
    def call(tiny, files):
        from modlm.inference.calibrate import calibrate_exit_threshold

        calibrate_exit_threshold(tiny, _ids(2, 16), fraction)

    return call


API_CASES = [
    # MoDTransformer.forward
    (
        "forward-id-too-large",
        _forward(idx_BT=lambda: _ids(2, 8).index_fill(1, torch.tensor([3]), 300)),
        ValueError,
        "token id 300",
    ),
    (
        "forward-id-negative",
        _forward(idx_BT=lambda: _ids(2, 8).index_fill(1, torch.tensor([0]), -1)),
        ValueError,
        "token id -1",
    ),
    ("forward-float-ids", _forward(idx_BT=lambda: _ids(2, 8, dtype=torch.float32)), ValueError, "torch.float32"),
    ("forward-bool-ids", _forward(idx_BT=lambda: _ids(2, 8, hi=2, dtype=torch.bool)), ValueError, "torch.bool"),
    ("forward-uint8-ids", _forward(idx_BT=lambda: _ids(2, 8, dtype=torch.uint8)), ValueError, "torch.uint8"),
    ("forward-1d-ids", _forward(idx_BT=lambda: _ids(8)), ValueError, "shape (8,)"),
    ("forward-3d-ids", _forward(idx_BT=lambda: _ids(2, 8, 1)), ValueError, "shape (2, 8, 1)"),
    ("forward-empty-ids", _forward(idx_BT=lambda: _ids(2, 0)), ValueError, "shape (2, 0)"),
    ("forward-list-ids", _forward(idx_BT=[[1, 2, 3]]), ValueError, "got list"),
    ("forward-too-long", _forward(idx_BT=lambda: _ids(1, 129)), ValueError, "129"),
    ("forward-bad-phase", _forward(phase="sideways"), ValueError, "phase='sideways'"),
    ("forward-targets-extra-dim", _with_targets(lambda: _ids(2, 8, 1)), ValueError, "shape (2, 8, 1)"),
    ("forward-targets-other-shape", _with_targets(lambda: _ids(2, 7)), ValueError, "shape (2, 7)"),
    (
        "forward-targets-too-large",
        _with_targets(lambda: _ids(2, 8).index_fill(1, torch.tensor([2]), 256)),
        ValueError,
        "token id 256",
    ),
    (
        "forward-targets-below-ignore",
        _with_targets(lambda: _ids(2, 8).index_fill(1, torch.tensor([2]), -2)),
        ValueError,
        "token id -2",
    ),
    ("forward-targets-float", _with_targets(lambda: _ids(2, 8, dtype=torch.float32)), ValueError, "torch.float32"),
    ("forward-targets-int32", _with_targets(lambda: _ids(2, 8, dtype=torch.int32)), ValueError, "torch.int32"),
    ("forward-targets-list", _with_targets([[1] * 8] * 2), ValueError, "got list"),
    # modlm.generate
    ("generate-id-too-large", _generate([[1, 300]]), ValueError, "token id 300"),
    ("generate-id-negative", _generate([[-1, 3]]), ValueError, "token id -1"),
    ("generate-float-id", _generate([[1, 2.0]]), ValueError, "2.0 (float)"),
    ("generate-bool-id", _generate([[1, True]]), ValueError, "True (bool)"),
    ("generate-float-tensor", _generate(lambda: _ids(1, 4, dtype=torch.float32)), ValueError, "torch.float32"),
    ("generate-bool-tensor", _generate(lambda: _ids(1, 4, hi=2, dtype=torch.bool)), ValueError, "torch.bool"),
    ("generate-3d-tensor", _generate(lambda: _ids(1, 2, 3)), ValueError, "shape (1, 2, 3)"),
    ("generate-tensor-id-too-large", _generate(lambda: _ids(1, 4) + 256), ValueError, "outside the vocabulary"),
    ("generate-flat-list", _generate([1, 2, 3]), ValueError, "prompt 0 is 1"),
    ("generate-string", _generate("hello"), ValueError, "str"),
    ("generate-no-prompts", _generate([]), ValueError, "prompts is empty"),
    ("generate-unknown-option", _generate([[1]], colour=1), ValueError, "colour"),
    ("generate-api-seed-overflow", _generate([[1]], seed=2**64), ValueError, f"seed={2**64}"),
    ("generate-stop-token-str", _generate([[1]], stop_tokens=["a"]), ValueError, "'a'"),
    # configs
    ("modelconfig-d-model", _config(d_model=-1), ValueError, "d_model=-1"),
    ("modelconfig-capacity", _config(capacity=0), ValueError, "capacity=0"),
    ("modelconfig-router", _config(router="magic"), ValueError, "magic"),
    ("modelconfig-heads", _config(d_model=64, n_heads=3), ValueError, "n_heads=3"),
    ("modelconfig-preset", lambda m, f: ModelConfig.from_name("giant"), ValueError, "giant"),
    ("genconfig-temperature-str", _gen_config(temperature="hot"), ValueError, "temperature='hot'"),
    ("genconfig-top-p-zero", _gen_config(top_p=0), ValueError, "top_p=0"),
    ("genconfig-max-new-tokens-float", _gen_config(max_new_tokens=2.5), ValueError, "max_new_tokens=2.5"),
    # calibration
    ("calibrate-fraction", _calibrate(lambda: _ids(2, 16), 1.5), ValueError, "target_fraction=1.5"),
    ("calibrate-fraction-str", _calibrate(lambda: _ids(2, 16), "half"), ValueError, "target_fraction='half'"),
    ("calibrate-id-too-large", _calibrate(lambda: _ids(2, 16) + 256), ValueError, "outside the vocabulary"),
    ("calibrate-list", _calibrate([[1, 2]]), ValueError, "got list"),
    ("calibrate-too-long", _calibrate(lambda: _ids(1, 200)), ValueError, "max_seq_len=128"),
    ("calibrate-dense", _calibrate(lambda: _ids(2, 16), dense=True), ValueError, "nothing to calibrate"),
    # checkpoints and FLOPs
    ("load-model-missing", _load("missing"), FileNotFoundError, "{missing}"),
    ("load-model-a-file", _load("file"), ValueError, "{file}"),
    ("load-model-empty-dir", _load("empty"), FileNotFoundError, "{empty}"),
    ("flops-beyond-context", _flops(10000), ValueError, "seq_len=10000"),
    ("flops-seq-len-bool", _flops(True), ValueError, "seq_len=True"),
    # early exit
    ("calibrate-exit-no-exit-layers", _calibrate_exit(0.5), ValueError, "no early-exit layers"),
]


@pytest.mark.parametrize("name,call,exc,fragment", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_mistake_is_a_one_line_error(tiny, files, name, call, exc, fragment):
    with pytest.raises(exc) as e:
        call(tiny, files)
    msg = str(e.value)
    assert "\n" not in msg and fragment.format(**files) in msg, msg


def test_the_table_is_big_enough():
    assert len(CLI_CASES) + len(API_CASES) >= 60
    assert len({_case_id(c) for c in CLI_CASES} | {c[0] for c in API_CASES}) == len(CLI_CASES) + len(API_CASES)


# --------------------------------------------------------------------------------------------
# The one handler
# --------------------------------------------------------------------------------------------


def _raiser(exc: BaseException):
    def fn():
        raise exc

    return fn


@pytest.mark.parametrize(
    "exc,fragment",
    [
        (ValueError("capacity=2 is invalid"), "capacity=2 is invalid"),
        (ValueError("first line\n  second line"), "first line second line"),
        (FileExistsError("runs/x already holds a checkpoint; pass --resume"), "runs/x already holds"),
        (FileExistsError(17, "File exists", "runs/x"), "File exists: runs/x"),
        (PermissionError(13, "Permission denied", "/root/out"), "Permission denied: /root/out"),
        (NotADirectoryError(20, "Not a directory", "a_file/run"), "Not a directory: a_file/run"),
        (IsADirectoryError(21, "Is a directory", "runs"), "Is a directory: runs"),
        (OSError(28, "No space left on device", "ckpt/model.safetensors"), "No space left on device: ckpt/"),
        (FloatingPointError("loss is nan at step 12"), "loss is nan at step 12"),
        (ImportError("plots need matplotlib: pip install 'modlm[plot]'"), "pip install 'modlm[plot]'"),
        (ValueError(), "ValueError"),
    ],
)
def test_expected_failures_end_in_one_line_and_exit_2(capsys, monkeypatch, exc, fragment):
    from modlm.errors import run_cli

    monkeypatch.delenv("MODLM_DEBUG", raising=False)
    assert run_cli(_raiser(exc), prog="modlm") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("modlm: error: ") and fragment in err, err


def test_mkdir_on_a_file_says_it_is_not_a_directory(tmp_path, capsys):
    from modlm.errors import run_cli

    (tmp_path / "f").write_text("x")
    assert run_cli(lambda: (tmp_path / "f").mkdir(parents=True, exist_ok=True)) == 2
    assert capsys.readouterr().err == f"modlm: error: File exists and is not a directory: {tmp_path / 'f'}\n"


def test_ctrl_c_is_interrupted_with_130_and_bugs_keep_their_traceback(capsys):
    from modlm.errors import run_cli

    assert run_cli(_raiser(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err == "modlm: interrupted\n"
    with pytest.raises(ZeroDivisionError):  # not an expected failure: a bug, shown as one
        run_cli(lambda: 1 / 0)
    assert run_cli(lambda: 3) == 3 and run_cli(lambda: {"a": 1}) == 0


def test_modlm_debug_keeps_the_traceback(monkeypatch, capsys):
    monkeypatch.setenv("MODLM_DEBUG", "1")
    with pytest.raises(ValueError, match="seq_len=0"):
        main(["flops", "--seq-len", "0"])
    monkeypatch.setenv("MODLM_DEBUG", "0")
    assert main(["flops", "--seq-len", "0"]) == 2


def test_the_same_train_twice_is_one_line(tmp_path, capsys, monkeypatch):
    """The second run into the same --out-dir is refused by name (exit 2), not a traceback."""
    monkeypatch.delenv("MODLM_DEBUG", raising=False)
    monkeypatch.setenv("MODLM_CACHE", str(tmp_path / "cache"))
    argv = [*TRAIN, "--eval-interval", "1", "--eval-batches", "1", "--batch-size", "2"]
    argv += ["--out-dir", str(tmp_path / "run")]
    assert main(argv) == 0
    capsys.readouterr()
    rc, out, err = _run(argv, capsys)
    assert rc == 2 and "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and str(tmp_path / "run") in lines[0], lines


def test_python_m_modlm_training_ends_the_same_way(tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", MODLM_CACHE=str(tmp_path / "cache"))
    env.pop("MODLM_DEBUG", None)
    (tmp_path / "f").write_text("x")
    argv = [*TRAIN[1:], "--out-dir", str(tmp_path / "f" / "run")]
    res = subprocess.run(
        [sys.executable, "-m", "modlm.training", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
        env=env,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("python -m modlm.training: error: ")
    assert str(tmp_path / "f") in res.stderr
