"""transformers' Auto classes: a modlm model saved with save_pretrained loads back with
AutoModelForCausalLM after register(), gives the same logits, and generate() picks the same
greedy tokens as modlm's own cached decoding, dense and routed."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

import modlm
from modlm import ModelConfig, MoDTransformer
from modlm.inference.calibrate import calibrate_thresholds
from modlm.inference.generate import generate
from modlm.interop import hf
from modlm.interop.llama import from_hf_llama
from modlm.spec.kinds import block_spec


def _model(name: str, **kw) -> MoDTransformer:
    """A tiny model with weights large enough that greedy text varies; a routed one's causal
    decisions are mixed (about half the tokens go through each routed block)."""
    torch.manual_seed(0)
    model = MoDTransformer(ModelConfig.from_name(name, init_std=0.3, **kw)).double().eval()
    if model.config.routed_layers:
        with torch.no_grad():
            for blk in (model.blocks[i] for i in model.config.routed_layers):
                blk.router.predictor.fc2.weight.mul_(50.0)
                blk.router.predictor.fc2.bias.zero_()
        sample = torch.randint(0, 256, (4, 96), generator=torch.Generator().manual_seed(9))
        calibrate_thresholds(model, sample, 0.5)
    return model


def _prompts(B=3, T=10, seed=1):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def _registered():
    hf.register()
    hf.register()  # idempotent


def test_register_makes_the_auto_classes_know_modlm():
    assert isinstance(AutoConfig.for_model("modlm"), hf.MoDConfig)
    assert modlm.hf.register is hf.register and modlm.hf.MoDForCausalLM is hf.MoDForCausalLM  # the short alias


def test_config_carries_the_model_config():
    cfg = ModelConfig.from_name("tiny", n_kv_heads=2)
    hf_cfg = hf.MoDConfig(cfg)
    assert hf_cfg.model_config == cfg
    assert hf.MoDConfig.from_dict(hf_cfg.to_dict()).model_config == cfg
    assert (hf_cfg.hidden_size, hf_cfg.num_hidden_layers, hf_cfg.num_key_value_heads) == (64, 4, 2)
    assert hf_cfg.tie_word_embeddings is True
    with pytest.raises(ValueError, match="ModelConfig.capacity=2.0 is invalid"):
        hf.MoDConfig(dict(cfg.to_dict(), capacity=2.0))


@pytest.mark.parametrize("name", ["tiny-dense", "tiny", "tiny-keys-kept"])
def test_save_pretrained_loads_with_auto_and_generates_like_modlm(tmp_path, name):
    model = _model(name)
    wrapped = hf.MoDForCausalLM.from_modlm(model)
    assert wrapped.model is model  # wrapped, not copied
    wrapped.save_pretrained(tmp_path)
    # .double() as the model was: from_pretrained(dtype=...) casts parameters but not the rotary tables.
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).double().eval()
    assert type(loaded) is hf.MoDForCausalLM and loaded.model.config == model.config
    assert loaded.model.lm_head.weight is loaded.model.tok_emb.weight  # still tied

    idx = _prompts()
    with torch.no_grad():
        for routing in ("topk", "causal"):
            want = model(idx, routing=routing).logits
            torch.testing.assert_close(loaded(idx, routing=routing).logits, want)

    got = loaded.generate(idx, max_new_tokens=24, do_sample=False)[:, idx.shape[1] :].tolist()
    want = generate(model, idx, 24, temperature=0, trace=True)  # cached causal decoding
    assert got == want.tokens
    assert all(len(set(row)) > 5 for row in got)  # varied text
    if model.config.routed_layers:  # the routes really were mixed
        used = [len(r) for row in want.routing for r in row]  # routed blocks each new token went through
        assert 0.1 < sum(used) / (len(used) * len(model.config.routed_layers)) < 0.9


def test_left_padded_batch_generates_like_modlm():
    model = _model("tiny")
    wrapped = hf.MoDForCausalLM.from_modlm(model)
    prompts = [_prompts(1, n, seed=n)[0].tolist() for n in (4, 11, 7)]
    ids, mask = _padded(prompts)
    T = ids.shape[1]
    got = wrapped.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert got[:, T:].tolist() == generate(model, prompts, 16, temperature=0).tokens


def _padded(prompts):
    """Left-padded ids and attention mask of ragged prompts, as a Hugging Face tokenizer gives them."""
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _count_inputs(model: MoDTransformer) -> list[tuple[int, ...]]:
    """The shape of the ids each forward of ``model`` receives, in order."""
    shapes = []
    model.register_forward_pre_hook(lambda mod, args: shapes.append(tuple(args[0].shape)))
    return shapes


@pytest.mark.parametrize("name", ["tiny-dense", "tiny", "tiny-keys-kept", "tiny-early-exit"])
@pytest.mark.parametrize("lengths", [(9,), (4, 11, 7)])
def test_cached_generate_decodes_one_token_per_forward_like_modlm(name, lengths):
    model = _model(name)
    wrapped = hf.MoDForCausalLM.from_modlm(model)
    prompts = [_prompts(1, n, seed=n)[0].tolist() for n in lengths]
    ids, mask = _padded(prompts)
    shapes = _count_inputs(model)
    out = wrapped.generate(
        ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0, return_dict_in_generate=True
    )
    # one prefill of the padded prompts, then one forward of one new token per row for each further token
    B, T = ids.shape
    assert shapes == [(B, T)] + [(B, 1)] * 15
    want = generate(model, prompts, 16, temperature=0, return_cache=True)
    assert out.sequences[:, T:].tolist() == want.tokens
    cache = out.cache
    assert isinstance(cache, hf.MoDCache) and cache.get_seq_length() == T + 15
    for i in range(model.config.n_layers):  # holds what modlm's own cache holds, layer by layer
        torch.testing.assert_close(cache.layer_lengths(i), want.cache.layer_lengths(i))
    kinds = model.config.layer_types
    seq = torch.tensor([len(p) + 15 for p in prompts])
    for i in model.config.routed_layers:  # a ragged routed layer holds only the tokens that went through it
        if block_spec(kinds[i]).cache_layout == "ragged":
            assert (cache.layer_lengths(i) < seq).any()


def test_cached_generate_stops_at_the_models_eos():
    idx = _prompts(2, 8)
    free = generate(_model("tiny"), idx, 20, temperature=0).tokens
    eos = free[0][6]  # a token row 0 picks mid-way
    model = _model("tiny", extra={"eos_token_id": eos})
    wrapped = hf.MoDForCausalLM.from_modlm(model)
    assert wrapped.generation_config.eos_token_id == eos
    want = generate(model, idx, 20, temperature=0).tokens
    assert len(want[0]) <= 7 and want[0][-1] == eos
    got = wrapped.generate(idx, max_new_tokens=20, do_sample=False, pad_token_id=0)[:, 8:].tolist()
    assert [row[: row.index(eos) + 1] if eos in row else row for row in got] == want


def test_use_cache_false_recomputes_the_sequence_each_step():
    model = _model("tiny")
    wrapped = hf.MoDForCausalLM.from_modlm(model)
    idx = _prompts(2, 6)
    shapes = _count_inputs(model)
    got = wrapped.generate(idx, max_new_tokens=8, do_sample=False, use_cache=False)
    assert shapes == [(2, 6 + i) for i in range(8)]
    assert got[:, 6:].tolist() == generate(model, idx, 8, temperature=0).tokens


def test_a_cache_continues_in_later_forwards():
    model = _model("tiny")
    wrapped = hf.MoDForCausalLM.from_modlm(model)
    idx = _prompts(2, 12)
    with torch.no_grad():
        want = model(idx, routing="causal").logits  # causal routing: prefill + decode equals one forward
        cache = hf.MoDCache(model.config)
        first = wrapped(idx[:, :5], routing="causal", cache=cache).logits
        rest = wrapped(idx[:, 5:], cache=cache).logits  # seven tokens, decoded one at a time
    # NOTE: not bit-exact: decoding computes the routed rows' router weights on its own path (fp32 router math).
    torch.testing.assert_close(torch.cat([first, rest], 1), want, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 12
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 3\); .* must be \(2, 13\)"):
        wrapped(idx[:, :1], attention_mask=torch.ones(2, 3), cache=cache)


def test_save_pretrained_writes_the_checkpoints_tokenizer(tmp_path, bpe_tokenizer_file):
    from transformers import AutoTokenizer, GenerationConfig

    from modlm.training.checkpoint import save_checkpoint
    from modlm.training.tokenizers import ByteTokenizer, HFTokenizer

    tok = HFTokenizer.from_file(bpe_tokenizer_file)
    eos = tok.encode("<|endoftext|>")[0]
    cfg = ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, extra={"eos_token_id": eos, "bos_token_id": eos})
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ckpt", MoDTransformer(cfg), cfg, tokenizer=tok)
    hf.MoDForCausalLM.from_checkpoint(tmp_path / "ckpt").save_pretrained(tmp_path / "out")
    auto = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "The quick brown fox, and émigré naïveté: 12 + 30 = 42."
    assert auto.encode(text, add_special_tokens=False) == tok.encode(text)
    assert auto.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert auto.eos_token == auto.bos_token == "<|endoftext|>"
    gen = GenerationConfig.from_pretrained(tmp_path / "out")
    assert (gen.eos_token_id, gen.bos_token_id) == (eos, eos)

    byte_model = hf.MoDForCausalLM.from_modlm(_model("tiny-dense"), ByteTokenizer())
    with pytest.warns(UserWarning, match="has no transformers equivalent: no tokenizer written"):
        byte_model.save_pretrained(tmp_path / "bytes")
    assert not (tmp_path / "bytes" / "tokenizer.json").exists()


def test_labels_give_modlm_loss_with_aux():
    model = _model("tiny").float().train()
    wrapped = hf.MoDForCausalLM.from_modlm(model)
    idx = _prompts(2, 32)
    labels = idx.clone()
    labels[0, :5] = -100  # ignored
    out = wrapped(idx, labels=labels)
    nxt = labels[:, 1:]  # transformers shifts inside the model; modlm takes the next tokens, -1 ignored
    targets = torch.cat([nxt.masked_fill(nxt == -100, -1), torch.full((2, 1), -1)], 1)
    ref = model(idx, targets)
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss)
    assert out.aux_loss > 0
    out.loss.backward()  # trains through the wrapper
    assert model.blocks[1].router.weight.grad is not None


def test_a_cache_or_a_bad_routing_is_refused():
    wrapped = hf.MoDForCausalLM.from_modlm(_model("tiny-dense"))
    idx = _prompts(1, 4)
    with pytest.raises(ValueError, match="takes a MoDCache, not a DynamicCache"):
        wrapped(idx, cache=transformers.DynamicCache())
    with pytest.raises(ValueError, match="takes a MoDCache, not a DynamicCache"):
        wrapped.generate(idx, max_new_tokens=2, do_sample=False, cache=transformers.DynamicCache())
    with pytest.raises(ValueError, match="routing='greedy'"):
        wrapped(idx, routing="greedy")
    with pytest.raises(ValueError, match="exceeds max_seq_len=128"):
        wrapped(torch.zeros(1, 129, dtype=torch.long))


def test_converted_llama_generates_through_auto_classes_like_llama(tmp_path):
    cfg = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.15,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(cfg).eval()
    hf.MoDForCausalLM.from_modlm(from_hf_llama(llama)).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    idx = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(3))
    want = llama.generate(idx, max_new_tokens=16, do_sample=False)
    assert loaded.generate(idx, max_new_tokens=16, do_sample=False).tolist() == want.tolist()


# Modules that must work without transformers installed (it is an optional extra).
_NO_TRANSFORMERS = ("modlm.config", "modlm.model", "modlm.routing", "modlm.inference", "modlm.training", "modlm.cli")


def test_the_model_code_does_not_import_transformers():
    root = Path(modlm.__file__).resolve().parent
    for path in root.rglob("*.py"):
        mod = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        if not mod.startswith(_NO_TRANSFORMERS):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "transformers" for n in names), f"{mod} imports transformers"
    # and the conversion module needs it only for GGUF files
    code = (
        "import sys, modlm.interop.llama, modlm.inference.generate, modlm.training.trainer, modlm.cli; "
        "assert 'transformers' not in sys.modules"
    )
    env = {**os.environ, "PYTHONPATH": str(root.parent), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
