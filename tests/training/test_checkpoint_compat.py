"""A checkpoint written before the package was laid out by concern (tests/fixtures/legacy_tiny,
made by tests/fixtures/make_legacy_fixture.py with that code) loads and computes identically."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import modlm

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
# Logits of order 1 computed on another CPU: fp32 rounding of differently ordered sums (seen 1.8e-7).
TOL = dict(rtol=0, atol=1e-5)


def test_legacy_checkpoint_loads_and_generates_identically():
    model = modlm.load_model(FIXTURES / "legacy_tiny")
    expected = load_file(str(FIXTURES / "legacy_tiny_expected.safetensors"))
    meta = json.loads((FIXTURES / "legacy_tiny_expected.json").read_text())
    assert model.config.layer_types == ("dense", "routed", "dense", "routed")
    # The fixture was written on another machine (another CPU, 2 threads): its matrix products may
    # sum in another order, so stored logits agree to fp32 rounding (ATOL), tokens and routes exactly.
    with torch.no_grad():
        torch.testing.assert_close(model(expected["inputs"], routing="topk").logits, expected["logits_topk"], **TOL)
        torch.testing.assert_close(model(expected["inputs"], routing="causal").logits, expected["logits_causal"], **TOL)
    greedy = modlm.generate(model, meta["prompts"], 32, temperature=0.0, trace=True, return_logits=True)
    assert greedy.tokens == meta["tokens"] and greedy.routing == meta["routing"]
    torch.testing.assert_close(greedy.logits, expected["gen_logits"], **TOL)
    sampled = modlm.generate(model, meta["prompts"], 32, temperature=1.0, seed=meta["sampled_seed"], trace=True)
    assert sampled.tokens == meta["sampled_tokens"] and sampled.routing == meta["sampled_routing"]
