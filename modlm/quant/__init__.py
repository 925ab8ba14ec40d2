"""Weight-only low-bit inference, applied to a built model from outside it.

``quantize_model(model, weights="int4" | "bf16")`` swaps every ``modlm.model.layers.Linear``
(attention qkv and proj, MLP gate_up and down, the LM head) for a layer of the same contract
with low-bit weights (``modlm.quant.linear``); the model's code is unchanged. The token
embedding stays in fp32: its lookup is not a product, and it untie from a quantized head.
Layers the int4 kernel cannot take (out_features not a multiple of 16, in_features not a
multiple of the group size) stay in bf16 instead, as the returned record says.
Not swapped: MoE experts (``modlm.model.moe``, grouped weights, no ``Linear``) and router /
predictor layers (plain ``nn.Linear``, tiny).

Measured on the 2-core AVX2 CPU of our figures (one thread, batch 1): the matrix products of
SmolLM2-135M take 33 ms a token in fp32 (few-row kernel) and in bf16, ~9 ms in int4.
"""

from modlm.quant.apply import FORMATS, apply_formats, model_formats, quantize_model
from modlm.quant.linear import Bf16Linear, Int4Linear, QuantLinear

__all__ = ["FORMATS", "Bf16Linear", "Int4Linear", "QuantLinear", "apply_formats", "model_formats", "quantize_model"]
