"""A GGUF file's Q4_0 / Q4_1 weights carried into int4 layers (``modlm convert --keep-quant``).

The tiny file is written here with gguf itself, as llama.cpp's converter writes one: q and k rows
permuted into llama.cpp's rotary layout, then quantized with ``gguf.quants.quantize``. The checks:
the unpacked q equal the file's exactly (no second rounding), the int4 weights equal the file's
dequantized values within the bf16 rounding of scale and zero, and they sit row for row where
``transformers``' dequantizing reader puts the same tensors (names, fusing and the q/k permutation).
"""

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")  # in the test extra: runs in CI
pytest.importorskip("transformers")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from modlm.cli import main  # noqa: E402
from modlm.interop.gguf_quant import keep_gguf_int4, q4_blocks, read_q4_linears  # noqa: E402
from modlm.interop.llama import LlamaSource, load_llama  # noqa: E402
from modlm.kernels import lowbit  # noqa: E402
from modlm.quant import Int4Linear  # noqa: E402
from modlm.training.checkpoint import load_model, read_checkpoint_config  # noqa: E402

D, H, G, F, L, V = 64, 4, 2, 128, 2, 64  # d_model, heads, kv heads, d_mlp, layers, vocab
HD = D // H
# The types of a Q4_0 / Q4_1 file: the head in 8 bits (stays fp32 here), norms and embedding float.
TYPES = {"attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q4_0, "attn_output": Q.Q4_1}
TYPES |= {"ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_1, "ffn_down": Q.Q4_0}


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permutation of q / k rows (rotate-half -> interleaved)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_metadata(w) -> None:
    """A byte-level BPE vocabulary of V tokens (no merges needed to encode single bytes); its
    end token is the one transformers adds to a GGUF BPE vocabulary that lacks it."""
    tokens = [chr(c) for c in range(ord("a"), ord("a") + V - 2)] + ["<s>", "<|endoftext|>"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (V - 2) + [3, 3])
    w.add_token_scores([0.0] * V)
    w.add_token_merges([])
    w.add_bos_token_id(V - 2)
    w.add_eos_token_id(V - 1)


def write_tiny_gguf(path, seed=0) -> dict[str, np.ndarray]:
    """A 2-layer Llama GGUF; returns its tensors as written (quantized ones as raw blocks)."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(G)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(HD)
    _tokenizer_metadata(w)
    shapes = {"attn_q": (D, D), "attn_k": (G * HD, D), "attn_v": (G * HD, D), "attn_output": (D, D)}
    shapes |= {"ffn_gate": (F, D), "ffn_up": (F, D), "ffn_down": (D, F)}
    written = {}

    def add(name, arr, kind=None):
        data = arr if kind is None else gguf.quants.quantize(arr, kind)
        w.add_tensor(name, data, raw_dtype=kind)
        written[name] = data

    add("token_embd.weight", rng.standard_normal((V, D)).astype(np.float32) * 0.1)
    for i in range(L):
        for short, shape in shapes.items():
            arr = (rng.standard_normal(shape) * 0.05 + rng.standard_normal((shape[0], 1)) * 0.02).astype(np.float32)
            if short in ("attn_q", "attn_k"):
                arr = _llama_cpp_permute(arr, H if short == "attn_q" else G)
            add(f"blk.{i}.{short}.weight", arr, TYPES[short])
        add(f"blk.{i}.attn_norm.weight", 1 + 0.1 * rng.standard_normal(D).astype(np.float32))
        add(f"blk.{i}.ffn_norm.weight", 1 + 0.1 * rng.standard_normal(D).astype(np.float32))
    add("output_norm.weight", np.ones(D, dtype=np.float32))
    add("output.weight", rng.standard_normal((V, D)).astype(np.float32) * 0.1, Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def _dequantized_state(self) -> dict[str, torch.Tensor]:
    """``LlamaSource.state_dict`` of a GGUF file by ``transformers``' own GGUF reader, called
    directly: the model loader it sits behind also wants ``accelerate``, which the test extra
    leaves out; the tensors (dequantized, q/k unpermuted, Hugging Face names) are the same."""
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf = LlamaForCausalLM(AutoConfig.from_pretrained(self.directory, gguf_file=self.gguf_file))
    path = str(self.directory / self.gguf_file)
    return load_gguf_checkpoint(path, return_tensors=True, model_to_load=hf)["tensors"]


@pytest.fixture(scope="module", autouse=True)
def _no_accelerate():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LlamaSource, "state_dict", _dequantized_state)
        yield


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


def _unpermute(q_NK: torch.Tensor, n_heads: int) -> torch.Tensor:
    n = q_NK.shape[0]
    return q_NK.reshape(n_heads, n // n_heads // 2, 2, -1).transpose(1, 2).reshape(q_NK.shape)


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1])
def test_q4_blocks_decode_to_the_files_values(kind):
    rng = np.random.default_rng(3)
    w_NK = (rng.standard_normal((16, 96)) * 0.1 + 0.03).astype(np.float32)
    raw = gguf.quants.quantize(w_NK, kind)
    q_NK, sz_GN2 = q4_blocks(raw, kind.name)
    assert q_NK.shape == (16, 96) and sz_GN2.shape == (3, 16, 2)
    assert int(q_NK.max()) <= 15
    # fp32 scale and zero give gguf's own dequantization (to fp32 rounding of d q + m).
    ref = torch.from_numpy(gguf.quants.dequantize(raw, kind))
    torch.testing.assert_close(lowbit.dequantize_int4(q_NK, sz_GN2), ref, rtol=0, atol=1e-6)
    if kind == Q.Q4_0:
        assert (sz_GN2[..., 1] == 0).all()


def test_q4_blocks_refuses_other_types():
    with pytest.raises(ValueError, match="Q8_0"):
        q4_blocks(np.zeros((16, 34), dtype=np.uint8), "Q8_0")


def test_int4_layers_hold_the_files_q_without_rounding_again(tiny_gguf):
    path, written = tiny_gguf
    model = load_llama(path)
    report = keep_gguf_int4(model, path)
    assert report["int4"] == 4 * L  # qkv, proj, gate_up, down in each layer
    assert report["fp32"] == ["lm_head"]  # Q8_0 in the file: converted as before
    layer = model.blocks[1].attn.qkv
    assert isinstance(layer, Int4Linear)
    q_NK = lowbit.unpack_int4(layer.packed, layer.out_features, layer.in_features)
    file_q, _ = q4_blocks(written["blk.1.attn_q.weight"], "Q4_0")
    file_k, _ = q4_blocks(written["blk.1.attn_k.weight"], "Q4_1")
    file_v, _ = q4_blocks(written["blk.1.attn_v.weight"], "Q4_0")
    want = torch.cat([_unpermute(file_q, H), _unpermute(file_k, G), file_v])
    assert torch.equal(q_NK, want)  # exactly the file's 4-bit values: no second rounding


def test_int4_weights_equal_the_dequantized_file_within_bf16_scales(tiny_gguf):
    path, _ = tiny_gguf
    floats = load_llama(path)  # transformers' dequantizing reader
    model = load_llama(path)
    report = keep_gguf_int4(model, path)
    assert report["int4"] == 4 * L
    for i in range(L):
        for name in ("attn.qkv", "attn.proj", "mlp.gate_up", "mlp.down"):
            ref = floats.get_submodule(f"blocks.{i}.{name}").weight
            layer = model.get_submodule(f"blocks.{i}.{name}")
            sz = layer.scales_and_zeros.float()
            # bf16 keeps 8 bits: scale and zero each move by at most 2^-9 of themselves.
            bound = (8 * sz[..., 0].abs() + sz[..., 1].abs()).t().repeat_interleave(32, dim=1) * 2**-8
            err = (layer.dequantize() - ref).abs()
            assert (err <= bound + 1e-7).all(), f"blocks.{i}.{name}: {err.max():.3g}"
    assert 0 < report["max_abs_diff"] <= 2**-7 * report["max_abs_weight"]


def test_read_q4_linears_skips_layers_not_all_4_bit(tiny_gguf):
    path, _ = tiny_gguf
    model = load_llama(path)
    found = read_q4_linears(path, model.config)
    assert "lm_head" not in found and set(found) == {
        f"blocks.{i}.{n}" for i in range(L) for n in ("attn.qkv", "attn.proj", "mlp.gate_up", "mlp.down")
    }


def test_convert_keep_quant_writes_an_int4_checkpoint(tiny_gguf, tmp_path, capsys):
    path, _ = tiny_gguf
    out = tmp_path / "ckpt"
    assert main(["convert", str(path), str(out), "--keep-quant"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["quant"]["int4"] == 4 * L and printed["quant"]["fp32"] == ["lm_head"]
    quant = read_checkpoint_config(out)["quant"]
    assert quant["blocks.0.mlp.gate_up"]["weights"] == "int4" and "lm_head" not in quant
    reloaded = load_model(out)
    direct = load_llama(path)
    keep_gguf_int4(direct, path)
    x = torch.randint(0, V, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, direct(x).logits, rtol=0, atol=0)


def test_keep_quant_needs_a_gguf_source(tmp_path, capsys):
    assert main(["convert", str(tmp_path), str(tmp_path / "out"), "--keep-quant"]) == 2
    assert "--keep-quant keeps a GGUF file's 4-bit weights" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_convert_keep_quant_reports_heldout_perplexity(tiny_gguf, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MODLM_CACHE", str(tmp_path / "cache"))
    path, _ = tiny_gguf
    data = tmp_path / "text"
    data.mkdir()
    rng = np.random.default_rng(0)
    for d in range(40):  # documents in the tiny vocabulary's letters
        (data / f"{d}.txt").write_text("".join(rng.choice(list("abcdefghij"), 200)))
    argv = ["convert", str(path), str(tmp_path / "ckpt"), "--keep-quant", "--eval-tokens", "64"]
    assert main([*argv, "--eval-seq-len", "32", "--data", str(data)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["eval_tokens"] == 64
    assert printed["ppl_quantized"] != printed["ppl_original"]
    assert abs(printed["ppl_quantized"] / printed["ppl_original"] - 1) < 0.05
    # Without --keep-quant there is nothing to compare.
    assert main(["convert", str(path), str(tmp_path / "plain"), "--eval-tokens", "64"]) == 2
    assert "needs --keep-quant" in capsys.readouterr().err
