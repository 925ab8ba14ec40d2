"""Weight-only low-bit inference, applied to a built model from outside it.

``quantize_model(model, weights="int4" | "bf16")`` swaps every ``modlm.model.layers.Linear``
(attention qkv and proj, MLP gate_up and down, the LM head) for a layer of the same contract
with low-bit weights (``modlm.quant.linear``); the model's code is unchanged. The token
embedding stays in fp32: its lookup is not a product (a quantized head is untied from it).
Layers the int4 kernel cannot take (out_features not a multiple of 16, in_features not a
multiple of the group size) stay in bf16 instead, as the returned record says.
Not swapped: MoE experts (``modlm.model.moe``, grouped weights, no ``Linear``) and router /
predictor layers (plain ``nn.Linear``, tiny).

Measured on the 2-core AVX2 CPU of our figures (one thread, batch 1, random weights of
SmolLM2-135M's shapes): its matrix products take 33-36 ms a token in fp32 (the few-row kernel)
and in bf16, 9-12 ms in int4. bf16 halves the memory and saves no time on this CPU.

NOTE: quantize after any dtype cast: ``model.double()`` / ``.half()`` cast buffers too, and
would turn the bf16 weights and int4 scales into another dtype.
"""

from modlm.quant.apply import FORMATS, apply_formats, model_formats, quantize_model
from modlm.quant.linear import Bf16Linear, Int4Linear, QuantLinear

__all__ = ["FORMATS", "Bf16Linear", "Int4Linear", "QuantLinear", "apply_formats", "model_formats", "quantize_model"]
