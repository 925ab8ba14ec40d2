"""modlm adapt on a tiny random Llama: the adapted model starts out computing what the original
does, tuning moves only the routing parameters (the base stays bit-identical), calibration routes
the target capacity, and the saved checkpoint loads and generates."""

import json
import random

import pytest
import torch
import transformers

from modlm.adapt.config import AdaptConfig, default_layers, parse_layers
from modlm.adapt.distill import kl_to_original, original_logits
from modlm.adapt.guards import GUARD_WINDOW, AdaptationCollapsed, CollapseGuard
from modlm.adapt.layers import block_influence, least_influential_layers, remove_layers
from modlm.adapt.routers import adapt_model
from modlm.adapt.tune import adapt_checkpoint
from modlm.cli import main
from modlm.inference.calibrate import measure_routed_fraction
from modlm.inference.generate import generate
from modlm.interop.llama import from_hf_llama
from modlm.training.checkpoint import load_model, load_tokenizer_from_checkpoint, save_checkpoint
from modlm.training.tokenizers import HFTokenizer


def _tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.15)
    return hf


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory, bpe_tokenizer_file):
    root = tmp_path_factory.mktemp("adapt")
    dense = from_hf_llama(_tiny_llama())
    save_checkpoint(root / "dense", dense, dense.config, tokenizer=HFTokenizer.from_file(bpe_tokenizer_file))
    rng = random.Random(0)
    words = "the of and to in a is that for it as was with be by on not this are or from at which".split()
    data = root / "text"
    data.mkdir()
    for i in range(6):
        (data / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(400)) + ".")
    return root / "dense", data, root / "cache"


@pytest.mark.parametrize("router", ["tuned", "attention"])
def test_the_adapted_model_starts_computing_what_the_original_does(dense_ckpt, router):
    dense = load_model(dense_ckpt[0])
    model = adapt_model(dense, router, 0.25, layers=(1, 2))
    assert model.config.routed_layers == (1, 2)
    x = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        ref = dense(x).logits
        torch.testing.assert_close(model(x, routing="causal").logits, ref, rtol=0, atol=1e-6)
        res = generate(model, x[:1, :8].tolist(), 6, temperature=0)
        assert res.tokens == generate(dense, x[:1, :8].tolist(), 6, temperature=0).tokens
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".router." in n for n in trainable)


@pytest.mark.parametrize("router", ["tuned", "attention"])
def test_adapt_freezes_the_base_trains_routers_and_saves_a_model_that_generates(dense_ckpt, router, tmp_path):
    src, data, cache = dense_ckpt
    cfg = AdaptConfig(router=router, capacity=0.5, layers=(1, 2), seq_len=32, steps=6, lr=1e-2, calib_tokens=256)
    out = adapt_checkpoint(src, tmp_path / "adapted", cfg, data=str(data), cache_dir=cache, log=lambda s: None)
    dense, model = load_model(src), load_model(out)
    assert model.config.router == router and model.config.routed_layers == (1, 2)
    base, adapted = dense.state_dict(), model.state_dict()
    for k, v in base.items():  # every pretrained weight bit-identical
        assert torch.equal(adapted[k], v), k
    new = {k: v for k, v in adapted.items() if k not in base}
    assert new and all(".router." in k for k in new)
    fresh = adapt_model(dense, router, 0.5, layers=(1, 2)).state_dict()
    moved = [k for k in new if k.endswith("weight") and not torch.equal(new[k], fresh[k])]
    assert moved  # tuning changed the routing parameters
    for i in (1, 2):  # calibrated: finite thresholds that route about the capacity of a sample
        assert torch.isfinite(model.blocks[i].router.threshold)
    tok = load_tokenizer_from_checkpoint(out)
    ids = torch.tensor([tok.encode("the of and to in a is that for it as was with be by on not this are")])
    frac = measure_routed_fraction(model, ids)
    assert all(0.1 < f < 0.9 for f in frac.values()), frac
    res = generate(model, ids[:, :8].tolist(), 8, temperature=0)
    assert len(res.tokens[0]) == 8
    manifest = json.loads((out / "config.json").read_text())
    assert manifest["train"]["adapt"]["router"] == router


def test_layers_and_defaults():
    assert parse_layers("14-16,3") == (3, 14, 15, 16)
    assert default_layers(30) == tuple(range(14, 29)) and default_layers(4) == (1, 2)
    with pytest.raises(ValueError, match="runs backwards"):
        parse_layers("5-3")


def test_cli_adapt_refuses_bad_input_in_one_line(dense_ckpt, tmp_path, capsys):
    src = str(dense_ckpt[0])
    for args, fragment in [
        (["--layers", "1,9"], "layers [9] are not layers"),
        (["--capacity", "0"], "AdaptConfig.capacity=0.0 is invalid"),
        (["--layers", "0", "--router", "attention"], "layer 0 has none"),
    ]:
        capsys.readouterr()
        assert main(["adapt", src, str(tmp_path / "out"), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("modlm: error: ") and fragment in err[0], err
    assert not (tmp_path / "out").exists()


def test_layer_removal_and_the_block_influence_ranking(dense_ckpt):
    dense = load_model(dense_ckpt[0])
    x = torch.randint(0, 512, (1, 24))
    short = remove_layers(dense, (2,))
    assert short.config.n_layers == 3
    with torch.no_grad():  # the kept blocks in order, each with its own weights
        h = dense.tok_emb(x)
        ref = dense(x, routing="topk")
        cos, sin = dense.rotary(torch.arange(24))
        for i in (0, 1, 3):
            h = h + dense.blocks[i].update(h, cos, sin)[0]
        torch.testing.assert_close(short(x).logits, dense.lm_head(dense.norm(h)), rtol=0, atol=1e-5)
        assert not torch.allclose(short(x).logits, ref.logits)
    influence = block_influence(dense, x)
    assert sorted(influence) == [0, 1, 2, 3] and all(0 <= v <= 2 for v in influence.values())
    assert least_influential_layers({0: 0.0, 1: 0.1, 2: 0.2, 3: 0.3, 4: 0.0, 5: 0.0}, 2) == (1, 4)
    with pytest.raises(ValueError, match="only 2 layers can be chosen"):
        least_influential_layers({0: 0.0, 1: 0.1, 2: 0.2, 3: 0.3, 4: 0.0, 5: 0.0}, 3)


def test_remove_layers_command_writes_the_kept_layers_and_reports_perplexity(dense_ckpt, tmp_path, capsys, monkeypatch):
    src, data, cache = dense_ckpt
    monkeypatch.setenv("MODLM_CACHE", str(cache))
    out = tmp_path / "short"
    assert main(["adapt", str(src), str(out), "--method", "remove-layers", "--drop", "1", "--data", str(data)]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert "held-out perplexity" in captured.err and "block compute kept 0.750" in captured.err
    manifest = json.loads((out / "config.json").read_text())
    removed = manifest["train"]["adapt"]["removed"]
    assert len(removed) == 1 and 0 < removed[0] < 3  # never the first or the last layer
    dense, model = load_model(src), load_model(out)
    assert model.config.n_layers == 3
    x = torch.randint(0, 512, (1, 24))
    with torch.no_grad():  # the command's model is the kept layers run by hand
        torch.testing.assert_close(model(x).logits, remove_layers(dense, tuple(removed))(x).logits, rtol=0, atol=0)
    report = manifest["train"]["eval"]
    assert report["compute_kept"] == 0.75 and report["ppl_original"] > 1 and report["ppl_adapted"] > 1
    assert result["ppl_adapted"] == report["ppl_adapted"] and result["method"] == "remove-layers"
    assert load_tokenizer_from_checkpoint(out).encode("the of") == load_tokenizer_from_checkpoint(src).encode("the of")
    assert len(generate(model, x[:, :8].tolist(), 4, temperature=0).tokens[0]) == 4


def test_remove_layers_counts_and_flags():
    assert AdaptConfig(method="remove-layers").layers_to_drop(30) == 6  # keep 0.8 by default
    assert AdaptConfig(method="remove-layers", keep=0.5).layers_to_drop(4) == 2
    assert AdaptConfig(method="remove-layers", drop=3).layers_to_drop(30) == 3
    with pytest.raises(ValueError, match="at most 2 can go"):
        AdaptConfig(method="remove-layers", drop=3).layers_to_drop(4)
    with pytest.raises(ValueError, match="applies to method remove-layers only"):
        AdaptConfig(keep=0.5)
    with pytest.raises(ValueError, match="give keep or drop, not both"):
        AdaptConfig(method="remove-layers", keep=0.5, drop=1)


def test_the_collapse_guard_rule():
    guard = CollapseGuard(49152, 1.0, "Lower --lr.")
    for step in range(1, 30):  # a loss within the margin never stops a run
        guard.check(step, 4.3, 3.5)
    guard = CollapseGuard(49152, 1.0, "Lower --lr.")
    for step in range(1, GUARD_WINDOW):  # nothing is judged before the window is full
        guard.check(step, 11.28, 3.52)
    with pytest.raises(AdaptationCollapsed, match=r"collapsed at step 10: training LM loss 11.28 .* Lower --lr\."):
        guard.check(GUARD_WINDOW, 11.28, 3.52)
    assert guard.limit(3.5) == 4.5 and guard.limit(20.0) == 21.0  # +max(1, 25%) capped at ln V, >= +1
    near_uniform = CollapseGuard(512, 1.0, "")
    for step in range(1, 30):  # a random original near ln(512)=6.24 may be matched, not beaten
        near_uniform.check(step, 6.3, 6.23)
    off = CollapseGuard(512, 0.0, "")
    for step in range(1, 30):
        off.check(step, float("nan"), 1.0)


def test_a_collapsed_run_writes_nothing_and_ends_in_one_line(dense_ckpt, tmp_path, capsys, monkeypatch):
    src, data, cache = dense_ckpt
    monkeypatch.setenv("MODLM_CACHE", str(cache))
    # Any loss counts as a collapse here: the run must stop at the first full window.
    monkeypatch.setattr(CollapseGuard, "limit", lambda self, original: -1.0)
    args = ["--layers", "1,2", "--seq-len", "32", "--steps", "20", "--lr", "1e3", "--data", str(data)]
    assert main(["adapt", str(src), str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("modlm: error: router tuning collapsed at step 10") and "Lower --lr (now 1000)" in err[-1]
    assert not (tmp_path / "out").exists()


def test_distillation_starts_at_zero_and_the_report_is_recorded(dense_ckpt, tmp_path):
    src, data, cache = dense_ckpt
    dense = load_model(src)
    model = adapt_model(dense, "tuned", 0.5, layers=(1, 2))
    x = torch.randint(0, 512, (2, 40))
    with torch.no_grad():  # the original is the adapted model with every gate open: the dense model
        torch.testing.assert_close(original_logits(model, x), dense(x).logits, rtol=0, atol=1e-6)
        assert float(kl_to_original(model(x, routing="causal").logits, original_logits(model, x))) == 0.0
    cfg = AdaptConfig(capacity=0.5, layers=(1, 2), seq_len=32, steps=12, lr=1e-2, calib_tokens=64, loss="kl")
    logged = []
    out = adapt_checkpoint(src, tmp_path / "kl", cfg, data=str(data), cache_dir=cache, log=logged.append)
    history = json.loads((out / "config.json").read_text())
    assert history["train"]["adapt"]["loss"] == "kl"
    report = history["train"]["eval"]
    assert set(report) == {"ppl_original", "ppl_adapted", "compute_kept", "eval_tokens"}
    assert 0.5 < report["compute_kept"] < 1.0
    assert any("held-out perplexity" in line and f"{report['ppl_original']:.2f}" in line for line in logged)
    first = next(line for line in logged if line.startswith("step="))
    assert "kl=" in first and "orig_lm_loss=" in first
