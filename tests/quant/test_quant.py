"""Weight-only low-bit linears: each equals its dequantize-then-matmul reference, a quantized model
decodes with its cache as it recomputes, keeps its greedy tokens, and saves bit for bit.

Tolerances: the products take bf16 activations and return bf16, so a layer's output differs
from the fp32 product of the same (dequantized) weight by the bf16 rounding of its input and of
its result: relative 2^-8 each, hence rtol = 2^-6 (a few ulps) and an atol of 2^-6 times the
output's scale for sums that cancel.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from modlm import ModelConfig, MoDTransformer
from modlm.cli import main
from modlm.inference.generate import generate
from modlm.kernels import lowbit
from modlm.model.layers import Linear
from modlm.quant import Bf16Linear, Int4Linear, model_formats, quantize_model
from modlm.training.checkpoint import load_model, read_checkpoint_config, save_checkpoint

FORMATS = ("bf16", "int4")


def _linear(n_out, n_in, bias=False, seed=0):
    torch.manual_seed(seed)
    lin = Linear(n_in, n_out, bias=bias)
    torch.nn.init.normal_(lin.weight, 0.0, 0.05)
    return lin


def _bf16_close(y, ref):
    torch.testing.assert_close(y, ref, rtol=2**-6, atol=2**-6 * ref.abs().max().item())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_int4_linear_equals_dequantize_then_matmul(rows, bias):
    lin = _linear(96, 128, bias)
    q = Int4Linear.from_linear(lin)
    x = torch.randn(2, rows, 128)
    y = q(x)
    assert y.dtype == torch.float32 and y.shape == (2, rows, 96)
    # The reference multiplies the same bf16-rounded activations by the dequantized weight in fp32.
    ref = F.linear(x.bfloat16().float(), q.dequantize(), None if q.bias is None else q.bias)
    _bf16_close(y, ref)
    # And the rounding to 4 bits is the asymmetric min/max one: at most half a step per weight.
    scale = q.scales_and_zeros[..., 0].float().t().repeat_interleave(32, dim=1)
    assert ((q.dequantize() - lin.weight).abs() <= 0.5 * scale + 1e-3 * lin.weight.abs()).all()


def test_int4_matches_the_formula_on_an_exact_weight():
    # Weights already on the int4 grid (scale 2^-4, zero 0) come back exactly.
    torch.manual_seed(1)
    q_NK = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    lin = Linear(64, 32, bias=False)
    with torch.no_grad():
        lin.weight.copy_((q_NK.float() - 8) / 16)
        lin.weight[:, 0] = -0.5  # each group spans the full grid, so min/max recover scale and zero
        lin.weight[:, 32] = -0.5
        lin.weight[:, 1] = 7 / 16
        lin.weight[:, 33] = 7 / 16
    q = Int4Linear.from_linear(lin)
    torch.testing.assert_close(q.dequantize(), lin.weight, rtol=0, atol=0)


@pytest.mark.parametrize("rows", [1, 7])
def test_bf16_linear_equals_bf16_weight_matmul(rows):
    lin = _linear(48, 80, bias=True)
    b = Bf16Linear.from_linear(lin)
    x = torch.randn(rows, 80)
    ref = F.linear(x.bfloat16().float(), lin.weight.bfloat16().float(), lin.bias)
    _bf16_close(b(x), ref)
    assert b(x.double()).dtype == torch.float64


@pytest.mark.parametrize("cls", [Bf16Linear, Int4Linear])
def test_forward_rows_is_a_slice_of_forward(cls):
    lin = _linear(96, 64)
    q = cls.from_linear(lin)
    x = torch.randn(3, 64)
    for rows in (slice(0, 32), slice(32, None)):
        torch.testing.assert_close(q.forward_rows(x, rows), q(x)[:, rows], rtol=2**-7, atol=1e-3)
        torch.testing.assert_close(lin.forward_rows(x, rows), lin(x)[:, rows])


def test_int4_shapes_the_kernel_refuses_are_named_and_fall_back_to_bf16():
    with pytest.raises(ValueError, match="in_features=48 is not a multiple of group_size=32"):
        Int4Linear(48, 32)
    with pytest.raises(ValueError, match="out_features=40 is not a multiple of 16"):
        Int4Linear(64, 40)
    with pytest.raises(ValueError, match="group_size=16 is invalid"):
        Int4Linear(64, 32, group_size=16)
    model = torch.nn.Sequential(Linear(48, 32), Linear(32, 40), Linear(64, 32))
    formats = quantize_model(model, "int4")
    assert [formats[k]["weights"] for k in ("0", "1", "2")] == ["bf16", "bf16", "int4"]


def test_bad_values_are_one_line_errors():
    model = MoDTransformer(ModelConfig.from_name("tiny"))
    with pytest.raises(ValueError, match="weights='int8' is invalid: must be one of int4, bf16"):
        quantize_model(model, "int8")
    with pytest.raises(ValueError, match="skip='head' is not a Linear layer"):
        quantize_model(model, "int4", skip=["head"])


def _tiny(preset="tiny"):
    torch.manual_seed(0)
    return MoDTransformer(ModelConfig.from_name(preset, max_seq_len=128)).eval()


@pytest.mark.parametrize("weights", FORMATS)
def test_quantized_model_has_buffers_not_parameters_and_keeps_the_embedding(weights):
    model = _tiny()
    n_linears = sum(isinstance(m, Linear) for m in model.modules())
    emb = model.tok_emb.weight.detach().clone()
    formats = quantize_model(model, weights, skip=["blocks.0.attn.qkv"])
    assert len(formats) == n_linears - 1 and "lm_head" in formats
    assert isinstance(model.blocks[0].attn.qkv, Linear)  # skipped: still fp32
    names = {n for n, _ in model.named_parameters()}
    assert "lm_head.weight" not in names and not any(".mlp." in n and "weight" in n for n in names)
    assert torch.equal(model.tok_emb.weight, emb)  # the embedding is a lookup: left as it was
    from modlm.spec.roles import parameter_roles

    parameter_roles(model)  # every remaining parameter still has a role


# Measured on these tiny random models: greedy tokens agree 100% with fp32 for both formats;
# the logits' max error is ~0.004 (bf16) and ~0.05 (int4) against a logit scale of ~1.5.
@pytest.mark.parametrize("weights,max_err", [("bf16", 0.02), ("int4", 0.15)])
def test_quantized_model_keeps_greedy_tokens(weights, max_err):
    ref_model, model = _tiny(), _tiny()
    quantize_model(model, weights)
    prompts = [[1, 2, 3, 4, 5], list(range(40, 60))]
    ref = generate(ref_model, prompts, 24, temperature=0.0, return_logits=True)
    got = generate(model, prompts, 24, temperature=0.0, return_logits=True)
    agree = sum(a == b for r, g in zip(ref.tokens, got.tokens) for a, b in zip(r, g)) / 48
    assert agree >= 0.9, agree
    x = torch.tensor([prompts[1]])
    with torch.no_grad():
        err = (model(x, routing="causal").logits - ref_model(x, routing="causal").logits).abs().max().item()
    assert err <= max_err, err


@pytest.mark.parametrize("preset", ["tiny", "tiny-keys-kept"])
@pytest.mark.parametrize("weights", FORMATS)
def test_quantized_cached_decoding_equals_recomputation(preset, weights):
    model = _tiny(preset)
    quantize_model(model, weights)
    prompts = [[3, 1, 4, 1], list(range(100, 115)), list(range(7, 34))]
    cached = generate(model, prompts, 32, seed=0, return_logits=True)
    full = generate(model, prompts, 32, seed=0, use_cache=False, return_logits=True)
    assert cached.tokens == full.tokens
    # Measured: equal to the bit (the kernels compute each row alone); the bound leaves bf16 room.
    torch.testing.assert_close(cached.logits, full.logits, rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("weights", FORMATS)
def test_quantized_checkpoint_round_trips_bit_for_bit(tmp_path, weights):
    model = _tiny()
    formats = quantize_model(model, weights)
    save_checkpoint(tmp_path / "q", model, model.config)
    manifest = read_checkpoint_config(tmp_path / "q")
    assert manifest["quant"] == formats and manifest["format_version"] == 2 and manifest["tied_weights"] == {}
    loaded = load_model(tmp_path / "q")
    assert model_formats(loaded) == formats
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    if weights == "int4":
        assert torch.equal(model.lm_head.packed, loaded.lm_head.packed)
    x = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    # Saving the loaded model again writes the same weights file, byte for byte.
    save_checkpoint(tmp_path / "q2", loaded, loaded.config)
    assert (tmp_path / "q" / "model.safetensors").read_bytes() == (tmp_path / "q2" / "model.safetensors").read_bytes()


def test_plain_checkpoints_keep_format_version_1(tmp_path):
    model = _tiny()
    save_checkpoint(tmp_path / "p", model, model.config)
    manifest = read_checkpoint_config(tmp_path / "p")
    assert manifest["format_version"] == 1 and "quant" not in manifest


def test_cli_quantize_then_generate(tmp_path, capsys):
    model = _tiny()
    save_checkpoint(tmp_path / "fp32", model, model.config)
    assert main(["quantize", str(tmp_path / "fp32"), str(tmp_path / "q"), "--weights", "int4"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["layers"] == {"int4": 17, "bf16": 0}
    assert main(["generate", "--ckpt", str(tmp_path / "q"), "--prompt", "ab", "--max-new-tokens", "5"]) == 0
    assert main(["quantize", str(tmp_path / "fp32"), str(tmp_path / "r"), "--weights", "int3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--weights='int3' is invalid: must be one of int4, bf16")
    assert not (tmp_path / "r").exists()


def test_group_size_is_recorded_and_checked():
    lin = _linear(32, 128)
    q = Int4Linear.from_linear(lin, group_size=64)
    assert q.record() == {"weights": "int4", "bias": False, "group_size": 64}
    ref = F.linear(torch.ones(1, 128).bfloat16().float(), q.dequantize())
    _bf16_close(q(torch.ones(1, 128)), ref)
    assert lowbit.quantize_int4(lin.weight, 64)[1].shape == (2, 32, 2)


def _greedy(capsys, *args):
    argv = ["generate", "--prompt", "ab", "--max-new-tokens", "6", "--temperature", "0", *args]
    assert main(argv) == 0
    got = capsys.readouterr()
    return got.out, next(line for line in got.err.splitlines() if line.startswith("# model"))


def test_cli_generate_quantizes_on_loading_as_quantize_does(tmp_path, capsys):
    model = _tiny()
    save_checkpoint(tmp_path / "fp32", model, model.config)
    assert main(["quantize", str(tmp_path / "fp32"), str(tmp_path / "q"), "--weights", "int4"]) == 0
    capsys.readouterr()
    stored, line_stored = _greedy(capsys, "--ckpt", str(tmp_path / "q"))
    on_the_fly, line = _greedy(capsys, "--ckpt", str(tmp_path / "fp32"), "--weights", "int4")
    assert on_the_fly == stored and line.endswith("weights=int4") and line_stored.endswith("weights=int4")
    _, line = _greedy(capsys, "--ckpt", str(tmp_path / "fp32"))
    assert line.endswith("weights=fp32")
    _, line = _greedy(capsys, "--ckpt", str(tmp_path / "fp32"), "--weights", "bf16")
    assert line.endswith("weights=bf16")
    # Layers stored in low bits stay as stored; --weights takes the fp32 ones.
    assert main(["quantize", str(tmp_path / "fp32"), str(tmp_path / "s"), "--skip", "lm_head"]) == 0
    capsys.readouterr()
    _, line = _greedy(capsys, "--ckpt", str(tmp_path / "s"), "--weights", "bf16")
    assert line.endswith("weights=int4:16+bf16:1")
    argv = ["generate", "--ckpt", str(tmp_path / "fp32"), "--prompt", "ab", "--weights", "int8"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().endswith("--weights='int8' is invalid: must be one of fp32, int4, bf16")


def test_cli_quantize_reports_heldout_perplexity_beside_the_original(tmp_path, capsys, monkeypatch):
    from modlm.adapt.guards import heldout_windows
    from modlm.inference.evaluation import evaluate_lm, window_batches
    from modlm.training.corpus import prepare_corpus

    monkeypatch.setenv("MODLM_CACHE", str(tmp_path / "cache"))
    model = _tiny()
    save_checkpoint(tmp_path / "fp32", model, model.config)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(400)))
    argv = ["quantize", str(tmp_path / "fp32"), str(tmp_path / "q"), "--eval-tokens", "96", "--eval-seq-len", "32"]
    assert main([*argv, "--data", str(text)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["eval_tokens"] == 96
    # The original's figure is evaluate_lm's on the same windows, causal routing as decoding.
    windows = heldout_windows(prepare_corpus(str(text)).val, 32, 96)
    ref = evaluate_lm(model, window_batches(model, windows, 1), routing="causal")
    assert report["ppl_original"] == pytest.approx(ref.perplexity, rel=1e-6)
    assert report["ppl_quantized"] != report["ppl_original"]
    assert abs(report["ppl_quantized"] / report["ppl_original"] - 1) < 0.1
    assert main([*argv[:2], str(tmp_path / "r"), "--eval-tokens", "-1"]) == 2
    assert capsys.readouterr().err.strip().endswith("--eval-tokens=-1 is invalid: must be >= 0 (0 skips the check)")
    assert not (tmp_path / "r").exists()
