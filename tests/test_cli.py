"""The CLI: thin, explains itself, and fails with one line naming the bad value."""

import json

import pytest

from modlm.cli import main


def _err_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("modlm: error: ")
    return err[0]


def test_flops_reports_mod_and_dense(capsys):
    assert main(["flops", "--model", "small", "--seq-len", "256"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    doc = json.loads(out[-1])
    assert 0.4 < doc["flop_ratio"] < 0.7  # 12.5% every other block: ~0.56 of the blocks
    assert doc["model"]["forward"] < doc["dense"]["forward"]


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["train", "--batch-size", "0"], "batch_size=0"),
        (["train", "--capacity", "1.5"], "capacity=1.5"),
        (["train", "--model-arg", "d_model"], "d_model"),
        (["train", "--model", "giant"], "giant"),
        (["generate", "--ckpt", "/nonexistent/ckpt", "--prompt", "hi"], "/nonexistent/ckpt"),
        (["generate", "--ckpt", "/nonexistent/ckpt"], "--prompt"),
        (["flops", "--model-arg", "capacity=0"], "capacity=0"),
    ],
)
def test_bad_arguments_give_one_line_errors(capsys, argv, fragment):
    assert main(argv) == 2
    assert fragment in _err_line(capsys)


def test_help_explains_itself(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for word in ("train", "generate", "flops", "examples"):
        assert word in out


def test_generate_from_a_checkpoint_streams_and_traces(tmp_path, capsys):
    import torch

    from modlm import ModelConfig, MoDTransformer
    from modlm.training.checkpoint import save_checkpoint

    cfg = ModelConfig.from_name("tiny")
    torch.manual_seed(0)
    model = MoDTransformer(cfg)
    save_checkpoint(tmp_path / "ckpt", model, cfg)
    assert (
        main(
            [
                "generate",
                "--ckpt",
                str(tmp_path / "ckpt"),
                "--prompt",
                "Hello",
                "--max-new-tokens",
                "8",
                "--temperature",
                "0",
                "--show-routing",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("Hello")
    assert "L1" in out and "L3" in out and "depth" in out  # the routing table
    # a prompt too long for the context: one line, nothing echoed
    assert main(["generate", "--ckpt", str(tmp_path / "ckpt"), "--prompt", "x" * 100, "--max-new-tokens", "50"]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and "max_seq_len=128" in cap.err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo two\n")
    assert (
        main(
            [
                "generate",
                "--ckpt",
                str(tmp_path / "ckpt"),
                "--prompts-file",
                str(prompts),
                "--max-new-tokens",
                "4",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [d["prompt"] for d in lines] == ["one", "two two"]


def _byte_checkpoint(tmp_path):
    import torch

    from modlm import ModelConfig, MoDTransformer
    from modlm.training.checkpoint import save_checkpoint

    cfg = ModelConfig.from_name("tiny")
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "ckpt", MoDTransformer(cfg), cfg)


def _hf_checkpoint(tmp_path, tokenizer_file):
    """A tiny random model whose vocabulary is the BPE tokenizer's, saved with that tokenizer."""
    import torch

    from modlm import ModelConfig, MoDTransformer
    from modlm.training.checkpoint import save_checkpoint
    from modlm.training.tokenizers import load_tokenizer

    tok = load_tokenizer(str(tokenizer_file))
    cfg = ModelConfig.from_name("tiny", vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = MoDTransformer(cfg).eval()
    return save_checkpoint(tmp_path / "hf_ckpt", model, cfg, tokenizer=tok), model, tok


def test_generate_encodes_and_decodes_with_the_checkpoints_tokenizer(tmp_path, capsys, bpe_tokenizer_file):
    from modlm.inference.generate import generate

    ckpt, model, tok = _hf_checkpoint(tmp_path, bpe_tokenizer_file)
    prompt = "The history of the café"
    expected = generate(model, [tok.encode(prompt)], 12, temperature=0.0).tokens[0]
    assert max(expected) >= 256  # ids a byte tokenizer could not even decode

    argv = ["generate", "--ckpt", str(ckpt), "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert cap.out == prompt + tok.decode(expected) + "\n"  # streamed, then joined: the whole decode
    assert f"tokenizer={tok.name}" in cap.err

    assert main(argv + ["--show-routing"]) == 0
    rows = capsys.readouterr().out.split("# routing of prompt 0")[1].strip().splitlines()[2:-1]
    assert len(rows) == len(expected) - 1  # the last token is sampled, never fed back through the blocks
    for t, row in zip(expected, rows):  # each token's own text, as the tokenizer decodes it
        assert row.startswith(f"{repr(tok.decode([t]))[1:-1][:8]:<9}")

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("naïve 東京\nThe city\n", encoding="utf-8")
    assert (
        main(
            [
                "generate",
                "--ckpt",
                str(ckpt),
                "--prompts-file",
                str(prompts),
                "--max-new-tokens",
                "5",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    batch = generate(model, [tok.encode("naïve 東京"), tok.encode("The city")], 5, temperature=0.0).tokens
    assert [d["completion"] for d in lines] == [tok.decode(t) for t in batch]


def test_generate_streams_a_multi_byte_character_whole(tmp_path, capsys, monkeypatch):
    """The byte model's output goes through the tokenizer: a character split over bytes prints once, whole."""
    import modlm.inference.generate as gen_mod

    ckpt = _byte_checkpoint(tmp_path)
    text = "é東🚀!"

    def fake_generate(model, prompts, max_new_tokens, stream=None, **kwargs):
        ids = list(text.encode("utf-8"))
        for t in ids:
            stream(0, t)
        return gen_mod.GenerationResult(tokens=[ids])

    monkeypatch.setattr(gen_mod, "generate", fake_generate)
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", "a", "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out == "a" + text + "\n"


@pytest.mark.parametrize("stop,count", [("", 0), ("ab", 2), ("é", 2)])
def test_stop_must_be_exactly_one_token(tmp_path, capsys, stop, count):
    ckpt = _byte_checkpoint(tmp_path)
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", "Hi", "--stop", stop]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("modlm: error: ")
    assert f"--stop {stop!r}" in err[0] and f"encodes to {count} tokens" in err[0]


def test_stop_ends_the_row_at_that_token(tmp_path, capsys, bpe_tokenizer_file):
    from modlm.inference.generate import generate

    ckpt, model, tok = _hf_checkpoint(tmp_path, bpe_tokenizer_file)
    free = generate(model, [tok.encode("The")], 12, temperature=0.0).tokens[0]
    # The first generated token whose text encodes back to that one token can be a --stop.
    j = next(i for i, t in enumerate(free) if tok.decode([t]) and tok.encode(tok.decode([t])) == [t])
    assert (
        main(
            [
                "generate",
                "--ckpt",
                str(ckpt),
                "--prompt",
                "The",
                "--max-new-tokens",
                "12",
                "--temperature",
                "0",
                "--stop",
                tok.decode([free[j]]),
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == "The" + tok.decode(free[: j + 1]) + "\n"


def test_routed_fraction_calibrates_on_text_in_the_checkpoints_tokens(
    tmp_path, capsys, monkeypatch, bpe_tokenizer_file
):
    import modlm.training.corpus as corpus_mod

    ckpt, _, tok = _hf_checkpoint(tmp_path, bpe_tokenizer_file)
    src = tmp_path / "text"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.txt").write_text(f"The history of the city {i}. " * 200)
    real, seen = corpus_mod.prepare_corpus, []

    def small_corpus(source=None, **kwargs):  # the bundled corpus, shrunk to a few KB
        seen.append((source, kwargs["tokenizer"].name))
        return real(str(src), cache_dir=tmp_path / "cache", tokenizer=kwargs["tokenizer"])

    monkeypatch.setattr(corpus_mod, "prepare_corpus", small_corpus)
    assert (
        main(["generate", "--ckpt", str(ckpt), "--prompt", "The", "--max-new-tokens", "4", "--routed-fraction", "0.5"])
        == 0
    )
    assert seen == [(None, tok.name)]
    assert capsys.readouterr().out.startswith("The")


def test_generate_threads_apply_during_the_command_and_are_restored(tmp_path, capsys, monkeypatch):
    import torch

    import modlm.inference.generate as gen_mod

    ckpt = _byte_checkpoint(tmp_path)
    seen = []

    def fake_generate(model, prompts, max_new_tokens, stream=None, **kwargs):
        seen.append(torch.get_num_threads())
        return gen_mod.GenerationResult(tokens=[[65]])

    monkeypatch.setattr(gen_mod, "generate", fake_generate)
    before = torch.get_num_threads()
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", "a", "--max-new-tokens", "4", "--threads", "2"]) == 0
    assert seen == [2] and torch.get_num_threads() == before
    assert "threads=2" in capsys.readouterr().err  # the resolved settings say so
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", "a", "--max-new-tokens", "4"]) == 0
    assert seen[-1] == 1  # the default: one thread, what decoding a few rows wants


def test_routed_fraction_calibrates_a_long_context_model_on_rows_that_fit(tmp_path, capsys, monkeypatch):
    """max_seq_len beyond the calibration text: rows of min(max_seq_len, cap, available) tokens."""
    import torch

    import modlm.cli as cli
    import modlm.inference.calibrate as calibrate
    from modlm import ModelConfig, MoDTransformer
    from modlm.inference.calibrate import get_thresholds
    from modlm.training.checkpoint import save_checkpoint

    cfg = ModelConfig.from_name("tiny", max_seq_len=400_000)  # more tokens than the bundled validation text
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "long", MoDTransformer(cfg), cfg)
    monkeypatch.setattr(cli, "CALIBRATION_ROW_TOKENS", 48)  # small rows keep the test fast
    monkeypatch.setattr(cli, "CALIBRATION_ROWS", 3)
    shapes, real = [], calibrate.calibrate_thresholds

    def spy(model, tokens, fraction):
        shapes.append(tuple(tokens.shape))
        th = real(model, tokens, fraction)
        assert th and all(t != 0.0 for t in get_thresholds(model).values())
        return th

    monkeypatch.setattr(calibrate, "calibrate_thresholds", spy)
    argv = ["generate", "--ckpt", str(ckpt), "--prompt", "Hi", "--max-new-tokens", "3", "--routed-fraction", "0.25"]
    assert main(argv) == 0
    assert shapes == [(3, 48)]
    capsys.readouterr()


# --------------------------------------------------------------------------------------- train
def _train_config(*argv: str):
    from modlm.cli import build_parser
    from modlm.training.config import train_config_from_args

    return train_config_from_args(build_parser().parse_args(["train", *argv]))


def test_every_preset_trains_with_default_settings():
    """Defaults follow the model: seq_len is min(256, max_seq_len) unless typed, so no preset refuses
    ``modlm train --model P`` (the tiny presets' max_seq_len is 128)."""
    from modlm.config import ModelConfig, preset_names

    for name in preset_names():
        cfg = _train_config("--model", name)
        assert cfg.seq_len == min(256, ModelConfig.from_name(name).max_seq_len), name
    assert _train_config("--model", "tiny", "--model-arg", "max_seq_len=512").seq_len == 256
    assert _train_config("--model", "small", "--seq-len", "64").seq_len == 64


def test_a_typed_seq_len_beyond_the_model_is_refused_in_one_line(capsys, tmp_path):
    assert main(["train", "--model", "tiny", "--seq-len", "256", "--out-dir", str(tmp_path / "run")]) == 2
    line = _err_line(capsys)
    assert "TrainConfig.seq_len=256 is invalid: must be <= the model's max_seq_len=128" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe", "tiny-amod", "tiny-keys-kept"])
def test_a_tiny_preset_trains_with_defaults_and_samples(preset, tmp_path, capsys):
    out = tmp_path / preset
    assert main(["train", "--model", preset, "--max-steps", "3", "--out-dir", str(out), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 3 and summary["tokens_seen"] == 3 * 16 * 128  # default batch x seq_len 128
    assert main(["generate", "--ckpt", str(out), "--prompt", "The", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("The")


def test_train_threads_apply_during_the_run_are_recorded_and_restored(tmp_path, capsys, monkeypatch):
    import torch

    import modlm.training.trainer as trainer

    seen = []

    def fake_train(cfg, resume=False, progress=True):
        seen.append((cfg.threads, torch.get_num_threads()))
        return {"step": 0}

    monkeypatch.setattr(trainer, "train", fake_train)
    before = torch.get_num_threads()
    assert main(["train", "--model", "tiny", "--threads", "2", "--out-dir", str(tmp_path)]) == 0
    assert seen == [(2, 2)] and torch.get_num_threads() == before
    assert main(["train", "--model", "tiny", "--out-dir", str(tmp_path)]) == 0
    assert seen[-1] == (1, 1)  # the default of every command: one thread


def test_train_threads_are_written_to_the_run_file(tmp_path, capsys):
    from modlm.training.runfile import to_toml

    assert "\nthreads = 3\n" in to_toml(_train_config("--model", "tiny", "--threads", "3"))


@pytest.mark.parametrize("command", [["train", "--model", "tiny"], ["generate", "--ckpt", "x", "--prompt", "a"]])
def test_negative_threads_are_one_line_errors(command, capsys, tmp_path):
    assert main([*command, "--threads", "-1"]) == 2
    assert "threads=-1 is invalid: must be >= 1 (or 0 for torch's default" in _err_line(capsys)


CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _eos_checkpoint(tmp_path, tokenizer_file, prompt_ids, eos_step=2, chat=False):
    """A tiny BPE checkpoint recording as eos the token its greedy continuation of ``prompt_ids``
    first produces at step ``eos_step`` or later; (ckpt, tokenizer, free continuation, eos).
    ``chat``: the tokenizer has <|im_start|>/<|im_end|> and a chat template."""
    import torch
    from tokenizers import Tokenizer

    from modlm import ModelConfig, MoDTransformer
    from modlm.inference.generate import generate
    from modlm.training.checkpoint import save_checkpoint
    from modlm.training.tokenizers import ChatTemplate, HFTokenizer

    backend = Tokenizer.from_file(str(tokenizer_file))
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    template = ChatTemplate(CHAT_TEMPLATE, {"eos_token": "<|im_end|>"}) if chat else None
    tok = HFTokenizer(backend.to_str().encode("utf-8"), chat_template=template)

    def model(**extra):
        torch.manual_seed(0)
        cfg = ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, extra=extra)
        m = MoDTransformer(cfg).eval()
        with torch.no_grad():  # weights large enough that greedy text varies
            for p in m.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.3)
        return m

    free = generate(model(), [prompt_ids(tok)], 12, temperature=0.0).tokens[0]
    eos = next(t for i, t in enumerate(free) if i >= eos_step and t not in free[:i])
    m = model(eos_token_id=eos)
    return save_checkpoint(tmp_path / "eos_ckpt", m, m.config, tokenizer=tok), tok, free, eos


def test_generate_stops_at_the_checkpoints_eos_without_printing_it(tmp_path, capsys, bpe_tokenizer_file):
    ckpt, tok, free, eos = _eos_checkpoint(tmp_path, bpe_tokenizer_file, lambda tok: tok.encode("The city"))
    j = free.index(eos)
    argv = ["generate", "--ckpt", str(ckpt), "--prompt", "The city", "--max-new-tokens", "12", "--temperature", "0"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert cap.out == "The city" + tok.decode(free[:j]) + "\n" and f"eos=[{eos}]" in cap.err
    assert f"# {j + 1} tokens in" in cap.err  # the eos was generated, then decoding ended
    assert main(argv + ["--ignore-eos"]) == 0
    cap = capsys.readouterr()
    assert cap.out == "The city" + tok.decode(free) + "\n" and "eos=ignored" in cap.err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The city\nThe city\n", encoding="utf-8")
    argv = ["generate", "--ckpt", str(ckpt), "--prompts-file", str(prompts), "--max-new-tokens", "12"]
    assert main(argv + ["--temperature", "0"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [d["completion"] for d in lines] == [tok.decode(free[:j])] * 2


def test_generate_chat_renders_the_template_and_stops_at_eos(tmp_path, capsys, bpe_tokenizer_file):
    from modlm.training.chat import apply_chat_template

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The city?"}]
    ckpt, tok, free, eos = _eos_checkpoint(
        tmp_path, bpe_tokenizer_file, lambda tok: tok.encode(apply_chat_template(tok, chat)), chat=True
    )
    assert apply_chat_template(ckpt, chat).endswith("The city?<|im_end|>\n<|im_start|>assistant\n")
    argv = ["generate", "--ckpt", str(ckpt), "--chat", "The city?", "--system", "Be brief.", "--temperature", "0"]
    assert main(argv + ["--max-new-tokens", "12"]) == 0
    cap = capsys.readouterr()
    assert cap.out == tok.decode(free[: free.index(eos)]) + "\n" and "chat=True" in cap.err  # the reply alone
    # each --chat is one conversation; several are batched, JSON lines out
    assert main(argv + ["--chat", "The city?", "--max-new-tokens", "12"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert lines == [{"prompt": "The city?", "completion": tok.decode(free[: free.index(eos)])}] * 2


def test_chat_flags_that_do_not_fit_are_one_line(tmp_path, capsys, bpe_tokenizer_file):
    ckpt = _byte_checkpoint(tmp_path)
    cases = [
        (["--chat", "hi"], f"--chat: checkpoint {ckpt} has no chat template"),
        (["--prompt", "a", "--system", "Be brief."], "--system 'Be brief.' needs --chat"),
        (["--prompt", "a", "--chat", "hi"], "--prompt and --chat both given"),
        (["--prompt", "a", "--ignore-eos=yes"], "--ignore-eos: ignored explicit argument 'yes'"),
    ]
    for extra, fragment in cases:
        assert _exit_code(["generate", "--ckpt", str(ckpt), *extra]) == 2
        cap = capsys.readouterr()
        lines = cap.err.strip().splitlines()
        assert cap.out == "" and len(lines) == 1 and lines[0].startswith("modlm"), (extra, lines)
        assert fragment in lines[0], (extra, lines)


def _exit_code(argv):
    """main's status, also when the parser exits (a flag given a value it does not take)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code
