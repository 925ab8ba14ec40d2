"""Adapters to and from Hugging Face, applied from outside the model code.

- ``modlm.interop.llama``: the Llama conversion table (Hugging Face names -> modlm names, with
  the fusing rules) and ``from_hf_llama`` / ``load_llama`` / ``convert_llama`` (``modlm convert``).
- ``modlm.interop.hf``: ``MoDConfig`` and ``MoDForCausalLM`` for ``transformers``' Auto classes
  (``register()``); ``modlm.hf`` is a short alias.
- ``modlm.interop.pretrained``: a real pretrained model offline: SmolLM2-135M's GGUF file
  (``smollm2_gguf``), the Hugging Face model of a directory or GGUF (``load_hf``), its timed
  greedy decoder (``hf_decoder``) and the logits parity of a converted model against it.

Adapting a converted model to Mixture-of-Depths is ``modlm.adapt``, a floor above this one.

Nothing under ``modlm.model``, ``modlm.routing``, ``modlm.inference`` or ``modlm.training``
imports ``transformers``: it is an optional extra (``pip install modlm[hf]``).
"""
