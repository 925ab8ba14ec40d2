"""A checkpoint written before the package was laid out by concern (tests/fixtures/legacy_tiny,
made by tests/fixtures/make_legacy_fixture.py with that code) loads and computes identically."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import modlm

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_legacy_checkpoint_loads_and_generates_identically():
    model = modlm.load_model(FIXTURES / "legacy_tiny")
    expected = load_file(str(FIXTURES / "legacy_tiny_expected.safetensors"))
    meta = json.loads((FIXTURES / "legacy_tiny_expected.json").read_text())
    assert model.config.layer_types == ("dense", "routed", "dense", "routed")
    with torch.no_grad():
        assert torch.equal(model(expected["inputs"], routing="topk").logits, expected["logits_topk"])
        assert torch.equal(model(expected["inputs"], routing="causal").logits, expected["logits_causal"])
    greedy = modlm.generate(model, meta["prompts"], 32, temperature=0.0, trace=True, return_logits=True)
    assert greedy.tokens == meta["tokens"] and greedy.routing == meta["routing"]
    # The fixture was written with 2 threads, the suite runs 1: the products may sum in another
    # order, so the logits agree to fp32 rounding (tokens and routes exactly).
    torch.testing.assert_close(greedy.logits, expected["gen_logits"], rtol=0, atol=1e-5)
    sampled = modlm.generate(model, meta["prompts"], 32, temperature=1.0, seed=meta["sampled_seed"], trace=True)
    assert sampled.tokens == meta["sampled_tokens"] and sampled.routing == meta["sampled_routing"]
