"""The ``modlm`` command line: thin wrappers over the library, one function per subcommand.

Each subcommand prints its resolved settings first. Bad input ends with one line,
``modlm: error: ...``, naming the offending value, and exit status 2: flag errors from the
parser, and every expected failure of the work (``modlm.errors.run_cli``: bad values, files that
cannot be read or written, a diverged run). ``MODLM_DEBUG=1`` keeps the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from modlm.config import ModelConfig, preset_names
from modlm.devices import DEVICE_HELP, add_threads_arg, use_threads
from modlm.errors import ArgumentParser, run_cli
from modlm.spec.fields import parse_assignments
from modlm.spec.routers import ROUTINGS

EPILOG = """examples:
  modlm train                                   # the default MoD model on the bundled corpus
  modlm train --data my_texts/ --out-dir runs/mine --max-steps 3000
  modlm train --model small-dense --out-dir runs/dense   # the dense twin, for comparison
  modlm train --config run.toml --compile --log tensorboard   # a TOML run file; flags override it
  modlm generate --ckpt runs/mod --prompt "The history of" --show-routing
  modlm flops --model small --seq-len 256
  modlm bench decode --batch-sizes 1 16          # decode tokens/s, MoD vs dense twin
  modlm quantize runs/mod runs/mod-int4 --weights int4   # 4-bit weights for CPU decoding
  modlm isoflop --budgets 1e12,4e12 --family dense --family mod
  modlm reproduce --scale default
"""


# ------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    """Train a Mixture-of-Depths (or dense) language model; checkpoints and metrics go to --out-dir."""
    from modlm.training.config import train_config_from_args
    from modlm.training.trainer import train_command

    cfg = train_config_from_args(args)
    summary = train_command(cfg, resume=args.resume, progress=args.progress)
    print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool, type(None)))}))
    return 0


# ---------------------------------------------------------------------------------------- generate
def _routing_table(
    tokenizer, text_tokens: list[int], routing: list[list[int]], routed_layers: tuple[int, ...], color: bool
) -> str:
    """A column view: one line per generated token, a mark per routed block it went through."""
    on = "\033[1;32m●\033[0m" if color else "#"
    off = "\033[2m·\033[0m" if color else "."
    head = "token    " + " ".join(f"L{i:<2}" for i in routed_layers) + "  depth"
    lines = [head]
    for tok, used in zip(text_tokens, routing):
        # One token alone: part of a multi-token character shows as U+FFFD.
        shown = repr(tokenizer.decode([tok]))[1:-1][:8]
        marks = " ".join(f"{on if i in used else off}  " for i in routed_layers)
        lines.append(f"{shown:<9}{marks} {len(used)}/{len(routed_layers)}")
    if routing:
        fracs = [sum(i in u for u in routing) / len(routing) for i in routed_layers]
        lines.append("routed   " + " ".join(f"{f:>3.0%}" for f in fracs))
    return "\n".join(lines)


def _read_chats(args: argparse.Namespace) -> list[list[dict[str, str]]]:
    """One conversation per ``--chat`` (the user's turn, after ``--system`` if given); [] without
    --chat. ValueError naming the flag that does not fit."""
    if not args.chat:
        if args.system is not None:
            raise ValueError(f"--system {args.system!r:.40} needs --chat TEXT (the user's turn)")
        return []
    if args.prompt is not None or args.prompts_file is not None:
        given = "--prompt" if args.prompt is not None else "--prompts-file"
        raise ValueError(f"{given} and --chat both given: --chat is the prompt (through the chat template)")
    system = [] if args.system is None else [{"role": "system", "content": args.system}]
    return [system + [{"role": "user", "content": text}] for text in args.chat]


def _chat_prompts(ckpt: str, tokenizer, chats: list[list[dict[str, str]]]) -> list[str]:
    """Each conversation rendered by the checkpoint's chat template, the assistant's turn opened."""
    from modlm.training.chat import apply_chat_template

    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"--chat: checkpoint {ckpt} has no chat template (modlm convert keeps a chat model's; "
            "use --prompt for plain text)"
        )
    return [apply_chat_template(tokenizer, messages) for messages in chats]


def _read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompt texts of ``--prompt`` or ``--prompts-file`` (ValueError naming what is wrong)."""
    if args.prompt is None and args.prompts_file is None:
        raise ValueError("give --prompt TEXT, --prompts-file FILE or --chat TEXT")
    if args.prompts_file is None:
        return [args.prompt]
    p = Path(args.prompts_file)
    if p.is_dir():
        raise ValueError(f"--prompts-file {p} is a directory: give a text file, one prompt per line")
    if not p.is_file():
        raise ValueError(f"--prompts-file {p}: file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts-file {p} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {p} has no non-empty line")
    return prompts


def _stop_tokens(tokenizer, stops: list[str]) -> list[int]:
    """The token id of each ``--stop`` text; each must be exactly one token of ``tokenizer``."""
    ids = []
    for text in stops:
        toks = tokenizer.encode(text)
        if len(toks) != 1:
            raise ValueError(
                f"--stop {text!r} encodes to {len(toks)} tokens with the {tokenizer.name} tokenizer; "
                "a stop text must be exactly one token"
            )
        ids.append(toks[0])
    return ids


# Calibration rows: at most this many tokens each. Attention costs T^2 per row, so a model with a
# very long context is calibrated on windows no longer than the longest preset's (2048: every
# preset's sample is what it was before the cap).
CALIBRATION_ROW_TOKENS = 2048
CALIBRATION_ROWS = 16


def _calibrate(model, tokenizer, routed_fraction: float, device) -> None:
    """Set causal-routing thresholds so routed blocks take ``routed_fraction`` of the bundled corpus' tokens.

    The sample is up to 16 rows of min(max_seq_len, 2048, available) tokens of the validation text.
    """
    import torch

    from modlm.inference.calibrate import calibratable_blocks, calibrate_thresholds
    from modlm.training.corpus import prepare_corpus

    try:  # before reading the corpus: a dense or random-router model fails at once
        calibratable_blocks(model)
    except ValueError as e:
        raise ValueError(f"--routed-fraction={routed_fraction}: {e}") from None
    cfg = model.config
    # The model reads ids of its own tokenizer, so the calibration text is encoded with it too.
    val = prepare_corpus(None, tokenizer=tokenizer).val
    T = min(cfg.max_seq_len, CALIBRATION_ROW_TOKENS, len(val))
    if T < 1:
        raise ValueError("--routed-fraction: the calibration text encodes to no tokens")
    rows = min(len(val) // T, CALIBRATION_ROWS)
    sample = torch.as_tensor(val[: rows * T].astype("int64")).view(rows, T).to(device)  # (rows, T)
    calibrate_thresholds(model, sample, routed_fraction)


def cmd_generate(args: argparse.Namespace) -> int:
    """Sample text from a checkpoint with causal routing and the routed KV cache.

    Prompts are encoded, and output decoded, with the tokenizer saved in the checkpoint. A row
    ends at the checkpoint's end-of-sequence token (unless --ignore-eos), which is not printed.
    --chat renders a user turn through the checkpoint's chat template (modlm convert keeps it).
    --speculative drafts --gamma tokens with the model's own blocks minus some (--draft-skip or
    --draft-keep) and verifies them in one forward: the same output, greedy token for token.
    """
    with use_threads(args.threads):
        return _generate(args)


def _generate(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from modlm.devices import parse_device
    from modlm.inference.generate import GenerationConfig, eos_tokens, validate_prompts
    from modlm.quant import FORMATS
    from modlm.training.checkpoint import load_tokenizer_from_checkpoint

    # Everything that can be checked before loading is checked first: a mistake costs no wait.
    gen = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        use_cache=not args.no_cache,
        prefill_routing=args.prefill_routing,
        trace=args.show_routing,
    )
    chats = _read_chats(args)
    prompts_text = [] if chats else _read_prompts(args)
    if args.routed_fraction is not None and not 0.0 < args.routed_fraction <= 1.0:  # before loading anything
        raise ValueError(f"--routed-fraction={args.routed_fraction} is invalid: must be in (0, 1]")
    _check_speculative_flags(args)
    device = parse_device(args.device)
    if args.weights not in (None, "fp32", *FORMATS):
        raise ValueError(f"--weights={args.weights!r} is invalid: must be one of fp32, {', '.join(FORMATS)}")
    if args.weights == "int4" and device.type != "cpu":
        raise ValueError(f"--weights=int4 runs on the CPU kernel only, but --device is {device}")
    tok = load_tokenizer_from_checkpoint(args.ckpt)  # first: a checkpoint without a chat template costs no load
    model_text = _chat_prompts(args.ckpt, tok, chats) if chats else prompts_text
    model = _load_with_weights(args.ckpt, args.weights, device)
    gen = dataclasses.replace(gen, stop_tokens=_stop_tokens(tok, args.stop))
    prompts = validate_prompts(model, [tok.encode(t) for t in model_text], gen.max_new_tokens)
    cfg = model.config
    eos = () if args.ignore_eos else eos_tokens(cfg)
    if args.routed_fraction is not None:
        _calibrate(model, tok, args.routed_fraction, device)
    spec = (_draft(model, args), args.gamma) if args.speculative else None
    print(
        f"# model {cfg.name}: d={cfg.d_model} layers={cfg.n_layers} routed={list(cfg.routed_layers)} "
        f"capacity={cfg.capacity} causal_routing={cfg.causal_routing} tokenizer={tok.name} | "
        f"temperature={args.temperature} top_k={args.top_k} top_p={args.top_p} seed={args.seed} "
        f"eos={'ignored' if args.ignore_eos else list(eos) or 'none'} chat={bool(chats)} "
        f"cache={not args.no_cache} device={device} threads={torch.get_num_threads()} "
        f"weights={_weight_formats(model)}"
        + (f" | speculative gamma={args.gamma} draft layers={list(spec[0].keep)}" if spec else ""),
        file=sys.stderr,
    )
    # A chat prints the reply only (its prompt is the template's markup); plain text echoes the prompt.
    shown = [m[-1]["content"] for m in chats] if chats else prompts_text
    res = _sample_and_print(
        model, tok, prompts, gen, eos, echo="" if chats else prompts_text[0], shown=shown, spec=spec
    )
    tps = res.new_tokens / max(res.decode_s + res.prefill_s, 1e-9)
    print(f"# {res.new_tokens} tokens in {res.prefill_s + res.decode_s:.2f}s ({tps:.1f} tok/s)", file=sys.stderr)
    if spec is not None:
        print(f"# speculative: acceptance {res.acceptance:.2f}, {res.steps} verify steps", file=sys.stderr)
    if args.show_routing:
        color = sys.stdout.isatty()
        for row, toks in enumerate(res.tokens):
            print(f"\n# routing of prompt {row} (each generated token; {len(cfg.routed_layers)} routed blocks)")
            print(_routing_table(tok, toks, res.routing[row], cfg.routed_layers, color))
    return 0


def _load_with_weights(ckpt: str, weights: str | None, device):
    """The checkpoint's model with its fp32 linear layers quantized to ``weights`` ("int4" / "bf16"
    by ``modlm.quant.quantize_model``; None or "fp32": as stored). Layers the checkpoint already
    holds in low bits stay as they are."""
    from modlm.quant import quantize_model
    from modlm.training.checkpoint import load_model

    if weights in (None, "fp32"):
        return load_model(ckpt, device=device)
    model = load_model(ckpt)  # quantized on the CPU, then moved
    quantize_model(model, weights)
    return model.to(device)


def _weight_formats(model) -> str:
    """The linear layers' weight formats, e.g. "int4" or "int4:16+fp32:1"."""
    from modlm.model.layers import Linear
    from modlm.quant import QuantLinear

    counts: dict[str, int] = {}
    for m in model.modules():
        kind = m.weights if isinstance(m, QuantLinear) else "fp32" if isinstance(m, Linear) else None
        if kind is not None:
            counts[kind] = counts.get(kind, 0) + 1
    return next(iter(counts)) if len(counts) == 1 else "+".join(f"{k}:{n}" for k, n in counts.items()) or "none"


def _check_speculative_flags(args: argparse.Namespace) -> None:
    """One-line errors for speculative-decoding flags, before anything is loaded."""
    if not args.speculative:
        for flag, value in (("--draft-skip", args.draft_skip), ("--draft-keep", args.draft_keep)):
            if value is not None:
                raise ValueError(f"{flag}={value} needs --speculative")
        return
    if args.gamma < 1:
        raise ValueError(f"--gamma={args.gamma} is invalid: must be an int >= 1")
    if args.draft_skip is not None and args.draft_keep is not None:
        raise ValueError("give --draft-skip or --draft-keep, not both")
    if args.draft_keep is not None and not 0.0 < args.draft_keep <= 1.0:
        raise ValueError(f"--draft-keep={args.draft_keep} is invalid: must be in (0, 1]")
    for flag, on in (("--no-cache", args.no_cache), ("--show-routing", args.show_routing)):
        if on:
            raise ValueError(f"{flag} is not supported with --speculative")


def _draft(model, args: argparse.Namespace):
    """The draft the flags name: --draft-skip LAYERS, else --draft-keep FRACTION (default 0.5)."""
    from modlm.inference.speculative import LayerSkipDraft

    if args.draft_skip is not None:
        try:
            skip = [int(i) for i in args.draft_skip.split(",") if i.strip()]
        except ValueError:
            raise ValueError(f"--draft-skip={args.draft_skip!r} is invalid: give layer indices like 2,3,5") from None
        return LayerSkipDraft.skipping(model, skip)
    return LayerSkipDraft.keeping(model, 0.5 if args.draft_keep is None else args.draft_keep)


def _sample_and_print(model, tok, prompts, gen, eos: tuple[int, ...], echo: str, shown: list[str], spec=None):
    """Decode; one prompt streams (after ``echo``), several print JSON lines. The eos token that
    ended a row is a marker, not text: it is not printed. ``spec``: (draft, gamma) to decode
    speculatively (``modlm.inference.speculative``)."""
    from modlm.inference.generate import generate
    from modlm.inference.speculative import speculative_generate
    from modlm.training.tokenizers import StreamDecoder

    streaming = len(prompts) == 1
    decoder = StreamDecoder(tok, context=prompts[0])
    started = []

    def stream(row: int, token: int) -> None:
        if not started:  # the prompt is echoed once generation has really begun (inputs were valid)
            sys.stdout.write(echo)
            started.append(True)
        if token not in eos:
            sys.stdout.write(decoder.push(token))
            sys.stdout.flush()

    stream_fn = stream if streaming else None
    if spec is None:
        res = generate(model, prompts, gen.max_new_tokens, config=gen, stream=stream_fn)
    else:
        draft, gamma = spec
        res = speculative_generate(
            model, prompts, gen.max_new_tokens, draft=draft, gamma=gamma, config=gen, stream=stream_fn
        )
    if streaming:
        sys.stdout.write(decoder.flush() + "\n")
    else:
        for text, toks in zip(shown, res.tokens):
            toks = toks[:-1] if toks and toks[-1] in eos else toks
            print(json.dumps({"prompt": text, "completion": tok.decode(toks)}, ensure_ascii=False))
    return res


# ------------------------------------------------------------------------------------------- flops
def cmd_flops(args: argparse.Namespace) -> int:
    """Forward and training FLOPs of a config (routed blocks at their capacity) beside its dense twin."""
    from modlm.flops import flops, format_flops

    overrides = parse_assignments(args.model_arg, into=ModelConfig)
    if args.capacity is not None:
        overrides["capacity"] = args.capacity
    cfg = ModelConfig.from_name(args.model, **overrides)
    T = cfg.max_seq_len if args.seq_len is None else args.seq_len
    rows = []
    twin = cfg.dense_twin()
    for c in (cfg, twin) if twin.layer_types != cfg.layer_types else (cfg,):
        r = flops(c, T)
        rows.append((c.name, r))
    print(f"{'config':<16}{'fwd/seq':>14}{'train/seq':>14}{'train/token':>14}{'routed blocks':>16}{'routers':>12}")
    for name, r in rows:
        print(
            f"{name:<16}{format_flops(r.forward):>14}{format_flops(r.train):>14}{format_flops(r.train_per_token):>14}"
            f"{format_flops(r.routed_blocks):>16}{format_flops(r.routers):>12}"
        )
    out = {"seq_len": T, "model": rows[0][1].as_dict()}
    if len(rows) == 2:
        out["dense"] = rows[1][1].as_dict()
        out["flop_ratio"] = rows[0][1].forward / rows[1][1].forward
        print(f"{cfg.name} / dense forward FLOPs: {out['flop_ratio']:.3f}")
    print(json.dumps(out))
    return 0


# ------------------------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    """Run a benchmark (MoD vs its dense twin, side by side): a table, then one JSON line."""
    import importlib

    from modlm.bench import BENCHMARKS

    module = importlib.import_module(f"modlm.bench.{BENCHMARKS[args.name][0]}")
    # The benchmark parses its own options; its --help and errors then read "modlm bench NAME".
    prog, sys.argv[0] = sys.argv[0], f"modlm bench {args.name}"
    try:
        module.main(args.bench_args)
    finally:
        sys.argv[0] = prog
    return 0


# ----------------------------------------------------------------------------------------- convert
def cmd_convert(args: argparse.Namespace) -> int:
    """Convert a Hugging Face Llama-architecture model (a directory with config.json + safetensors, or a
    .gguf file) into a dense modlm checkpoint with its tokenizer. --keep-quant (GGUF): the linear
    layers the file stores as Q4_0 / Q4_1 stay 4-bit (int4 layers of the file's own values and
    block scales); --eval-tokens N then compares their held-out perplexity with the float model's."""
    from modlm.interop.llama import convert_llama
    from modlm.training.checkpoint import read_checkpoint_config

    def show(cfg, tok) -> None:
        print(
            f"# converting {args.src} -> {args.out}: d={cfg.d_model} layers={cfg.n_layers} heads={cfg.n_heads} "
            f"kv_heads={cfg.n_kv_heads} d_mlp={cfg.d_mlp} vocab={cfg.vocab_size} max_seq_len={cfg.max_seq_len} "
            f"rope_base={cfg.rope_base:g} norm_eps={cfg.norm_eps:g} tied={cfg.tie_embeddings} tokenizer={tok.name} "
            f"eos={cfg.extra.get('eos_token_id')} chat_template={tok.chat_template is not None}",
            file=sys.stderr,
        )

    _check_eval_args(args)
    if args.eval_tokens and not args.keep_quant:
        raise ValueError(f"--eval-tokens={args.eval_tokens} compares quantized weights: it needs --keep-quant")
    kwargs = {"max_seq_len": args.max_seq_len, "tokenizer": args.tokenizer, "on_start": show}
    if args.keep_quant:
        from modlm.interop.gguf_quant import convert_gguf_int4

        out, kept = convert_gguf_int4(args.src, args.out, **kwargs)
    else:
        out = convert_llama(args.src, args.out, **kwargs)
    result = {"checkpoint": str(out), "model": read_checkpoint_config(out)["model"]}
    if args.keep_quant:
        result["quant"] = kept
        result.update(_quality(out, args, reference=lambda: _unquantized(args.src, args.max_seq_len)))
    print(json.dumps(result))
    return 0


def _unquantized(src: str, max_seq_len: int | None):
    """The source converted without --keep-quant (every weight as float): the reference."""
    from modlm.interop.llama import load_llama

    return load_llama(src, max_seq_len=max_seq_len)


def _check_eval_args(args: argparse.Namespace) -> None:
    """Refuse a bad held-out check before any work."""
    if args.eval_tokens < 0:
        raise ValueError(f"--eval-tokens={args.eval_tokens} is invalid: must be >= 0 (0 skips the check)")
    if args.eval_seq_len < 1:
        raise ValueError(f"--eval-seq-len={args.eval_seq_len} is invalid: must be >= 1")


def _quality(ckpt, args: argparse.Namespace, reference) -> dict:
    """{ppl_original, ppl_quantized, eval_tokens}: held-out perplexity of the checkpoint ``ckpt``
    and of ``reference()`` (its unquantized model), causal routing as decoding, on the validation
    split of --data in the checkpoint's tokens; {} when --eval-tokens is 0. Speed is never
    quoted without it."""
    if args.eval_tokens <= 0:
        return {}
    from modlm.adapt.guards import heldout_report, heldout_windows
    from modlm.training.checkpoint import load_model, load_tokenizer_from_checkpoint
    from modlm.training.corpus import prepare_corpus

    corpus = prepare_corpus(args.data, tokenizer=load_tokenizer_from_checkpoint(ckpt))
    quantized = load_model(ckpt)
    windows = heldout_windows(corpus.val, min(args.eval_seq_len, quantized.config.max_seq_len), args.eval_tokens)
    rep = heldout_report(reference(), quantized, windows)
    return {"ppl_original": rep["ppl_original"], "ppl_quantized": rep["ppl_adapted"], "eval_tokens": rep["eval_tokens"]}


def cmd_quantize(args: argparse.Namespace) -> int:
    """Write a copy of a checkpoint whose linear layers (attention, MLP, LM head) hold low-bit
    weights for CPU decoding: --weights int4 (groups of 32 along the input, a bf16 scale and
    zero each, torch's CPU int4 kernel; a layer the kernel cannot take stays bf16) or bf16. The
    token embedding stays fp32. modlm generate --ckpt OUT decodes with it. --eval-tokens N ends by
    printing the held-out perplexity of the quantized and the original model."""
    from modlm.quant import FORMATS, quantize_model
    from modlm.training.checkpoint import load_model, load_tokenizer_from_checkpoint, save_checkpoint

    if args.weights not in FORMATS:
        raise ValueError(f"--weights={args.weights!r} is invalid: must be one of {', '.join(FORMATS)}")
    _check_eval_args(args)
    print(f"# quantizing {args.ckpt} -> {args.out}: weights={args.weights} skip={args.skip}", file=sys.stderr)
    tok = load_tokenizer_from_checkpoint(args.ckpt)
    model = load_model(args.ckpt)
    formats = quantize_model(model, args.weights, skip=args.skip)
    out = save_checkpoint(args.out, model, model.config, tokenizer=tok, extra_state={"quantized_from": str(args.ckpt)})
    counts = {w: sum(r["weights"] == w for r in formats.values()) for w in FORMATS}
    size = sum(f.stat().st_size for f in Path(out).iterdir())
    result = {"checkpoint": str(out), "weights": args.weights, "layers": counts, "bytes": size}
    result.update(_quality(out, args, reference=lambda: load_model(args.ckpt)))
    print(json.dumps(result))
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    """Adapt a dense checkpoint (modlm convert output) to run with less compute, and write it with
    its tokenizer to OUT. --method tune-routers (the default): routers on --layers at
    --capacity, the base frozen, only the routing parameters trained on a text sample (--loss lm,
    or kl: distillation from the original's next-token distribution), then the causal thresholds
    calibrated for decoding; --router tuned trains a zero-initialised score, --router attention
    (A-MoD) routes by the attention received in the previous layer and trains only its decode
    predictor. --method remove-layers: drop the blocks of lowest block influence (ShortGPT),
    never the first or the last, keeping --keep of them (default 0.8) or dropping --drop; the
    baseline any routed model has to beat. Every method ends by printing the held-out perplexity
    of the adapted and the original model as they decode (causal routing, on the data's
    validation split, never seen in adaptation) and the block compute kept; the checkpoint's
    config.json records them. Router tuning stops, writing nothing, when its training loss runs
    far above the original's (--max-loss-rise). Defaults: tune-routers, router tuned, capacity
    0.5, the later half of the layers but the last, loss lm, 200 steps of 1 x 256 tokens at lr
    2e-3, the thresholds calibrated on 1024 tokens, 2048 held-out tokens, 1 thread."""
    from modlm.adapt.config import AdaptConfig
    from modlm.adapt.tune import adapt_checkpoint
    from modlm.spec.fields import flag_values
    from modlm.training.checkpoint import read_checkpoint_config

    cfg = AdaptConfig(**flag_values(AdaptConfig, args))
    with use_threads(args.threads):
        out = adapt_checkpoint(args.ckpt, args.out, cfg, data=args.data, log=lambda line: print(line, file=sys.stderr))
    report = read_checkpoint_config(out)["train"]["eval"]
    print(json.dumps({"checkpoint": str(out), "method": cfg.method, **report}))
    return 0


def _add_adapt_args(p: argparse.ArgumentParser) -> None:
    """The options of ``modlm adapt``: ``AdaptConfig``'s fields, each declared with its flag."""
    from modlm.adapt.config import AdaptConfig
    from modlm.spec.fields import add_field_flags

    p.add_argument("ckpt", help="a dense modlm checkpoint (e.g. from modlm convert)")
    p.add_argument("out", help="the adapted checkpoint directory to write")
    add_field_flags(AdaptConfig, p)
    p.add_argument(
        "--data",
        default=None,
        help="text: 'enwiki' (bundled), a text file or a folder; its training split adapts, its validation split "
        "measures (default: enwiki)",
    )
    add_threads_arg(p)


# -------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """The ``modlm`` parser: one subparser per subcommand, each built by its ``_add_*_command``."""
    from modlm import __version__

    parser = ArgumentParser(
        prog="modlm",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="Mixture-of-Depths language models: train, sample, count FLOPs, benchmark.",
    )
    parser.add_argument("--version", action="version", version=f"modlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add_command in (
        _add_train_command,
        _add_generate_command,
        _add_flops_command,
        _add_bench_command,
        _add_convert_command,
        _add_quantize_command,
        _add_adapt_commands,
        _add_experiment_commands,
    ):
        add_command(sub)
    return parser


def _add_train_command(sub) -> None:
    """``modlm train``: the flags of TrainConfig (``modlm.training.config.add_train_args``)."""
    from modlm.training.config import add_train_args

    p = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    add_train_args(p)
    p.set_defaults(func=cmd_train)


def _add_generate_command(sub) -> None:
    """``modlm generate``: sampling, routing and device flags."""
    p = sub.add_parser("generate", help=cmd_generate.__doc__, description=cmd_generate.__doc__)
    p.add_argument("--ckpt", required=True, help="a checkpoint directory or a run's --out-dir")
    p.add_argument("--prompt", help="prompt text (streamed output)")
    p.add_argument("--prompts-file", help="a text file, one prompt per line (batched; JSON lines out)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        help="text that ends a row when generated; must be exactly one token (repeatable)",
    )
    p.add_argument(
        "--chat",
        action="append",
        default=[],
        metavar="TEXT",
        help="a user turn, rendered by the checkpoint's chat template with the assistant's turn opened "
        "(repeatable: one conversation each, batched)",
    )
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message before each --chat turn")
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="do not stop at the checkpoint's end-of-sequence token (decode --max-new-tokens)",
    )
    p.add_argument(
        "--no-cache", action="store_true", help="recompute the whole sequence per token (slow; for checking)"
    )
    p.add_argument(
        "--prefill-routing",
        choices=ROUTINGS,
        default="causal",
        help="route the prompt causally (default; equals a full causal forward) or by top-k",
    )
    p.add_argument(
        "--routed-fraction",
        type=float,
        default=None,
        help="compute knob: calibrate routing thresholds so routed blocks take this fraction of tokens",
    )
    p.add_argument("--show-routing", action="store_true", help="print which routed blocks each generated token used")
    p.add_argument(
        "--weights",
        default=None,
        help="int4 or bf16: quantize the checkpoint's fp32 linear layers on loading (modlm quantize's formats; "
        "int4 on the CPU only); fp32 or unset: as stored",
    )
    p.add_argument(
        "--speculative",
        action="store_true",
        help="self-speculative decoding: a draft of the model's own blocks proposes, the model verifies "
        "(same output; faster when the draft agrees)",
    )
    p.add_argument("--draft-skip", default=None, metavar="LAYERS", help="blocks the draft skips, e.g. 2,3,5")
    p.add_argument(
        "--draft-keep",
        type=float,
        default=None,
        metavar="FRACTION",
        help="fraction of blocks the draft keeps, evenly spaced (default 0.5 when --draft-skip is not given)",
    )
    p.add_argument("--gamma", type=int, default=4, help="tokens drafted per step (default: %(default)s)")
    p.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default: %(default)s)")
    add_threads_arg(p)
    p.set_defaults(func=cmd_generate)


def _add_flops_command(sub) -> None:
    """``modlm flops``."""
    p = sub.add_parser("flops", help=cmd_flops.__doc__, description=cmd_flops.__doc__)
    p.add_argument("--model", default="small", choices=preset_names(), help="preset (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the model's max_seq_len)")
    p.add_argument("--capacity", type=float, default=None, help="override the routed fraction")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="override a ModelConfig field")
    p.set_defaults(func=cmd_flops)


def _add_bench_command(sub) -> None:
    """``modlm bench NAME ...``: the benchmark parses the rest."""
    from modlm.bench import BENCHMARKS

    p = sub.add_parser(
        "bench",
        help=cmd_bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=cmd_bench.__doc__
        + "\n\nbenchmarks:\n"
        + "\n".join(f"  {name:15s} {desc}" for name, (_, desc) in BENCHMARKS.items())
        + "\n\nOptions after NAME go to the benchmark: modlm bench decode --help lists them. Method and figures:"
        " benchmarks/README.md.",
    )
    p.add_argument("name", choices=list(BENCHMARKS), metavar="NAME", help="one of: " + ", ".join(BENCHMARKS))
    p.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="...", help="options for the benchmark")
    p.set_defaults(func=cmd_bench)


def _add_convert_command(sub) -> None:
    """``modlm convert SRC OUT``."""
    p = sub.add_parser("convert", help=" ".join(cmd_convert.__doc__.split()), description=cmd_convert.__doc__)
    p.add_argument("src", help="a Hugging Face model directory (config.json + *.safetensors) or a .gguf file")
    p.add_argument("out", help="the checkpoint directory to write")
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="context to allocate rotary tables for (default: the model's, at most 8192)",
    )
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json to ship instead of the source's own")
    p.add_argument(
        "--keep-quant",
        action="store_true",
        help="GGUF: keep Q4_0 / Q4_1 linear layers in 4 bits (int4 layers of the file's own values and "
        "block scales, no second rounding); other layers convert to fp32 as without it",
    )
    _add_eval_args(p)
    p.set_defaults(func=cmd_convert)


def _add_quantize_command(sub) -> None:
    """``modlm quantize CKPT OUT --weights int4|bf16``."""
    p = sub.add_parser("quantize", help=" ".join(cmd_quantize.__doc__.split()), description=cmd_quantize.__doc__)
    p.add_argument("ckpt", help="a modlm checkpoint (or run directory)")
    p.add_argument("out", help="the quantized checkpoint directory to write")
    p.add_argument("--weights", default="int4", help="int4 or bf16 (default: int4)")
    p.add_argument("--skip", nargs="*", default=[], metavar="NAME", help="linear layers to keep in fp32, e.g. lm_head")
    _add_eval_args(p)
    p.set_defaults(func=cmd_quantize)


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    """The held-out perplexity check that ends ``quantize`` and ``convert --keep-quant``."""
    p.add_argument(
        "--eval-tokens",
        type=int,
        default=0,
        help="held-out tokens to measure the perplexity of the quantized and the unquantized model on "
        "(default: 0, skip)",
    )
    p.add_argument("--eval-seq-len", type=int, default=256, help="tokens per held-out window (default: %(default)s)")
    p.add_argument(
        "--data",
        default=None,
        help="text whose validation split measures: 'enwiki' (bundled), a text file or a folder (default: enwiki)",
    )


def _add_adapt_commands(sub) -> None:
    """``modlm adapt`` and ``modlm adapt-study``."""
    p = sub.add_parser("adapt", help=" ".join(cmd_adapt.__doc__.split()), description=cmd_adapt.__doc__)
    _add_adapt_args(p)
    p.set_defaults(func=cmd_adapt)

    from modlm.experiments.adapt_study import add_adapt_study_args, cmd_adapt_study

    p = sub.add_parser(
        "adapt-study", help=" ".join(cmd_adapt_study.__doc__.split()), description=cmd_adapt_study.__doc__
    )
    add_adapt_study_args(p)
    p.set_defaults(func=cmd_adapt_study)


def _add_experiment_commands(sub) -> None:
    """``modlm isoflop`` and ``modlm reproduce``."""
    from modlm.experiments.reproduce import add_reproduce_args, cmd_reproduce
    from modlm.experiments.study import add_isoflop_args, cmd_isoflop

    p = sub.add_parser("isoflop", help=" ".join(cmd_isoflop.__doc__.split()), description=cmd_isoflop.__doc__)
    add_isoflop_args(p)
    p.set_defaults(func=cmd_isoflop)
    p = sub.add_parser("reproduce", help=cmd_reproduce.__doc__.split("\n")[0], description=cmd_reproduce.__doc__)
    add_reproduce_args(p)
    p.set_defaults(func=cmd_reproduce)


def main(argv: list[str] | None = None) -> int:
    """``modlm``: parse the flags, run the subcommand; an expected failure is one line and exit 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_cli(args.func, args, prog=parser.prog)


if __name__ == "__main__":
    sys.exit(main())
