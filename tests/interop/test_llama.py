"""Llama conversion: equal logits and greedy tokens to transformers' LlamaForCausalLM on tiny
random models, the config mapping, the weight table's fusing rules, checkpoints on disk, and
one-line errors for what modlm cannot convert."""

import json

import pytest
import torch
import transformers

from modlm.cli import main
from modlm.config import ModelConfig
from modlm.inference.generate import generate
from modlm.interop.llama import (
    LLAMA_WEIGHTS,
    MAX_SEQ_LEN_CAP,
    convert_llama,
    from_hf_llama,
    llama_model_config,
    map_llama_weights,
    read_llama_config,
)
from modlm.model.transformer import MoDTransformer
from modlm.training.checkpoint import load_model, load_tokenizer_from_checkpoint
from modlm.training.tokenizers import HFTokenizer

VOCAB = 512  # >= the vocabulary of the conftest BPE tokenizer (400)


def _hf_llama(tie: bool, n_kv_heads: int = 2, **overrides):
    """A tiny random LlamaForCausalLM whose every weight (norms included) is far from its init."""
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=80,  # not the SwiGLU default: d_mlp must come from the config
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=256,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    kw.update(overrides)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Large enough weights that attention is far from uniform and logits are O(1+).
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
    return model


CASES = [(True, 2), (False, 2), (False, 4), (True, 1)]  # (tied embeddings, kv heads of 4)


@pytest.mark.parametrize("tie,n_kv_heads", CASES)
def test_converted_logits_equal_llama(tie, n_kv_heads):
    hf = _hf_llama(tie, n_kv_heads)
    model = from_hf_llama(hf)
    cfg = model.config
    assert (cfg.router, cfg.n_kv_heads, cfg.d_mlp, cfg.tie_embeddings) == ("none", n_kv_heads, 80, tie)
    assert (cfg.rope_base, cfg.norm_eps, cfg.vocab_size, cfg.max_seq_len) == (5000.0, 1e-5, VOCAB, 256)
    assert (model.lm_head.weight is model.tok_emb.weight) == tie
    idx = torch.randint(0, VOCAB, (3, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(idx).logits
        got = model(idx).logits
    assert want.std() > 1.0  # a test with power: logits far from zero and from each other
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tie,n_kv_heads", CASES[:2])
def test_greedy_generation_equals_llama(tie, n_kv_heads):
    hf = _hf_llama(tie, n_kv_heads)
    model = from_hf_llama(hf)
    prompt = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    want = hf.generate(prompt, max_new_tokens=24, do_sample=False)[:, prompt.shape[1] :].tolist()
    got = generate(model, prompt, 24, temperature=0).tokens
    assert got == want
    assert all(len(set(row)) > 5 for row in got)  # varied text, not one token repeated


def test_the_table_fuses_q_k_v_and_gate_up_in_order():
    cfg = llama_model_config(_hf_llama(True).config.to_dict())
    E, H, G, F = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.d_mlp
    state = {}
    for i in range(cfg.n_layers):
        for part, rows in (("q", H * E), ("k", G * E), ("v", G * E)):
            state[f"model.layers.{i}.self_attn.{part}_proj.weight"] = torch.full((rows, cfg.d_model), float(ord(part)))
        for part in ("gate", "up"):
            state[f"model.layers.{i}.mlp.{part}_proj.weight"] = torch.full((F, cfg.d_model), float(len(part)))
    out = map_llama_weights(state, cfg)
    qkv = out["blocks.2.attn.qkv.weight"][:, 0]
    assert qkv.tolist() == [ord("q")] * (H * E) + [ord("k")] * (G * E) + [ord("v")] * (G * E)
    gate_up = out["blocks.0.mlp.gate_up.weight"][:, 0]
    assert gate_up.tolist() == [4.0] * F + [2.0] * F  # gate rows first, then up
    # every modlm parameter of a dense model has a row in the one table
    names = {m.replace("{i}", "0") for m, _ in LLAMA_WEIGHTS.values()}
    dense = MoDTransformer(llama_model_config(_config_json(num_hidden_layers=1)))  # untied, one layer
    assert set(dense.state_dict()) == names


def test_unknown_and_missing_weights_are_named():
    hf = _hf_llama(False)
    cfg = from_hf_llama(hf).config
    state = dict(hf.state_dict())
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_norm\.weight"):
        map_llama_weights({**state, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}, cfg)
    del state["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match=r"k_proj.*layer 1"):
        map_llama_weights(state, cfg)


def _config_json(**overrides):
    d = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 1000,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    d.update(overrides)
    return d


def test_config_mapping_defaults_and_both_rope_layouts():
    cfg = llama_model_config(_config_json())  # keys left out take LlamaConfig's defaults
    assert (cfg.n_kv_heads, cfg.norm_eps, cfg.rope_base, cfg.tie_embeddings, cfg.max_seq_len) == (
        4,
        1e-6,
        10000.0,
        False,
        2048,
    )
    legacy = llama_model_config(_config_json(rope_theta=500000.0, rope_scaling=None))  # transformers 4.x files
    current = llama_model_config(_config_json(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}))
    assert legacy.rope_base == current.rope_base == 500000.0
    assert ModelConfig.from_dict(current.to_dict()) == current  # validates and round-trips


def test_max_seq_len_is_capped_and_bounded():
    long = _config_json(max_position_embeddings=131072)
    assert llama_model_config(long).max_seq_len == MAX_SEQ_LEN_CAP == 8192
    assert llama_model_config(long, max_seq_len=16384).max_seq_len == 16384
    with pytest.raises(ValueError, match="max_seq_len=4096 exceeds the model's max_position_embeddings=2048"):
        llama_model_config(_config_json(), max_seq_len=4096)


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_type='llama3'"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type='linear'"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_type='yarn'"),
        ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "model_type='mistral'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"head_dim": 32}, "head_dim=32"),
        ({"num_hidden_layers": None}, "no 'num_hidden_layers'"),
        ({"num_attention_heads": 3}, "ModelConfig.n_heads=3 is invalid"),
        ({"rms_norm_eps": "tiny"}, "ModelConfig.norm_eps='tiny' is invalid"),
    ],
)
def test_what_modlm_cannot_convert_is_one_line(overrides, fragment):
    d = _config_json(**overrides)
    with pytest.raises(ValueError) as e:
        llama_model_config(d)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def _save_source(hf, path, tokenizer_file=None, **save_kw):
    hf.save_pretrained(path, **save_kw)
    if tokenizer_file is not None:
        (path / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    return path


@pytest.mark.parametrize("tie", [True, False])
def test_convert_a_directory_to_a_checkpoint(tmp_path, bpe_tokenizer_file, tie):
    hf = _hf_llama(tie)
    # Sharded: the index file lists the shards.
    src = _save_source(hf, tmp_path / "src", bpe_tokenizer_file, max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").is_file()
    out = convert_llama(src, tmp_path / "ckpt")
    model = load_model(out)
    assert model.config == read_llama_config(src) and model.config.name == "src"
    assert model.config.extra["converted_from"] == str(src)
    tok = load_tokenizer_from_checkpoint(out)
    assert tok.sha256 == HFTokenizer.from_file(bpe_tokenizer_file).sha256
    idx = torch.tensor([tok.encode("The history of the city begins with a small village.")])
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, hf(idx).logits, atol=1e-4, rtol=0)


def test_converted_weights_load_into_a_routed_model(tmp_path):
    dense = from_hf_llama(_hf_llama(True))
    routed = MoDTransformer(dense.config.replace(router="learned"))
    missing, unexpected = routed.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and missing and all(".router." in k for k in missing)  # only routers are new


def test_cli_convert(tmp_path, bpe_tokenizer_file, capsys):
    src = _save_source(_hf_llama(False), tmp_path / "src")  # no tokenizer.json: --tokenizer gives one
    assert main(["convert", str(src), str(tmp_path / "ckpt"), "--tokenizer", str(bpe_tokenizer_file)]) == 0
    captured = capsys.readouterr()
    assert "kv_heads=2" in captured.err and "d_mlp=80" in captured.err
    doc = json.loads(captured.out.strip().splitlines()[-1])
    assert doc["checkpoint"] == str(tmp_path / "ckpt") and doc["model"]["router"] == "none"
    assert load_model(tmp_path / "ckpt").config.d_mlp == 80


def _one_line_error(capsys, argv, fragment):
    capsys.readouterr()  # drop what building the source printed (transformers' progress bars)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("modlm: error: ") and fragment in err[0], err


def test_cli_convert_bad_sources_fail_in_one_line(tmp_path, bpe_tokenizer_file, capsys):
    out = str(tmp_path / "ckpt")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(capsys, ["convert", str(empty), out], f"{empty} has no config.json")
    _one_line_error(capsys, ["convert", str(tmp_path / "nowhere"), out], "nowhere does not exist")

    mistral = tmp_path / "mistral"
    mistral.mkdir()
    (mistral / "config.json").write_text(json.dumps(_config_json(model_type="mistral")))
    _one_line_error(capsys, ["convert", str(mistral), out], "model_type='mistral'")

    scaled = tmp_path / "scaled"
    scaled.mkdir()
    (scaled / "config.json").write_text(json.dumps(_config_json(rope_scaling={"rope_type": "llama3", "factor": 8})))
    _one_line_error(capsys, ["convert", str(scaled), out], "rope_type='llama3'")

    no_tok = _save_source(_hf_llama(True), tmp_path / "no_tok")
    _one_line_error(capsys, ["convert", str(no_tok), out], "has no tokenizer.json")

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(_config_json()))
    (pickled / "pytorch_model.bin").write_bytes(b"")
    _one_line_error(
        capsys, ["convert", str(pickled), out, "--tokenizer", str(bpe_tokenizer_file)], "no *.safetensors weights"
    )
    assert not (tmp_path / "ckpt").exists()


# A SmolLM2-style template that also reads a special token (as Llama's templates read bos_token).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


def _chat_source(path, bpe_tokenizer_file, layout):
    """A tiny Llama chat model folder as ``transformers`` saves it: chat_template.jinja (layout
    "jinja"), or the template inside tokenizer_config.json ("config": older files) or listed
    there among named templates ("named"); eos ids in config.json and generation_config.json."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(bpe_tokenizer_file))
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE
    )
    end, text_end = fast.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    _save_source(_hf_llama(False, eos_token_id=text_end, bos_token_id=fast.bos_token_id), path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [end, text_end]}))
    fast.save_pretrained(path)
    if layout != "jinja":
        (path / "chat_template.jinja").unlink()
        config = json.loads((path / "tokenizer_config.json").read_text())
        config["chat_template"] = (
            CHAT_TEMPLATE
            if layout == "config"
            else [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHAT_TEMPLATE}]
        )
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return fast, end, text_end


@pytest.mark.parametrize("layout", ["jinja", "config", "named"])
def test_convert_keeps_the_chat_template_and_every_eos(tmp_path, bpe_tokenizer_file, layout, capsys):
    from modlm.training.chat import apply_chat_template

    fast, end, text_end = _chat_source(tmp_path / "src", bpe_tokenizer_file, layout)
    out = tmp_path / "ckpt"
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "src"), str(out)]) == 0
    assert f"eos=[{end}, {text_end}] chat_template=True" in capsys.readouterr().err
    want = fast.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert want.endswith("<|im_start|>assistant\n") and "Be brief.<|im_end|>" in want
    assert apply_chat_template(out, CHAT) == want  # rendered from the checkpoint alone
    tok = load_tokenizer_from_checkpoint(out)
    assert tok.encode(want) == fast(want, add_special_tokens=False)["input_ids"]
    assert tok.chat_template.render(CHAT, add_generation_prompt=False) == fast.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=False
    )
    # generation_config.json's ids first, then config.json's: decoding stops at either
    assert load_model(out).config.extra["eos_token_id"] == [end, text_end]


def test_convert_without_a_template_keeps_none(tmp_path, bpe_tokenizer_file):
    from modlm.training.chat import apply_chat_template

    src = _save_source(_hf_llama(True, eos_token_id=0), tmp_path / "src", bpe_tokenizer_file)
    out = convert_llama(src, tmp_path / "ckpt")
    assert load_tokenizer_from_checkpoint(out).chat_template is None
    assert load_model(out).config.extra["eos_token_id"] == 0  # one id stays an int, as config.json has it
    with pytest.raises(ValueError, match=f"{tmp_path / 'ckpt'} has no chat template"):
        apply_chat_template(out, CHAT)


def test_a_source_whose_named_templates_have_no_default_is_one_line(tmp_path, bpe_tokenizer_file):
    _chat_source(tmp_path / "src", bpe_tokenizer_file, "named")
    config = json.loads((tmp_path / "src" / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "x"}]
    (tmp_path / "src" / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"the chat templates \['tool_use'\] include no 'default' one"):
        convert_llama(tmp_path / "src", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
