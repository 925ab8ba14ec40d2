"""Adapters to and from Hugging Face, applied from outside the model code.

- ``modlm.interop.llama``: the Llama conversion table (Hugging Face names -> modlm names, with
  the fusing rules) and ``from_hf_llama`` / ``load_llama`` / ``convert_llama`` (``modlm convert``).
- ``modlm.interop.hf``: ``MoDConfig`` and ``MoDForCausalLM`` for ``transformers``' Auto classes
  (``register()``); ``modlm.hf`` is a short alias.

Nothing under ``modlm.model``, ``modlm.routing``, ``modlm.inference`` or ``modlm.training``
imports ``transformers``: it is an optional extra (``pip install modlm[hf]``).
"""
