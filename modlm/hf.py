"""Short alias of ``modlm.interop.hf``: ``modlm.hf.register()``, ``modlm.hf.MoDForCausalLM.from_modlm(model)``.

Importing it needs ``transformers`` (``pip install 'modlm[hf]'``).
"""

from modlm.interop.hf import MODEL_TYPE, MoDCache, MoDCausalLMOutput, MoDConfig, MoDForCausalLM, register

__all__ = ["MODEL_TYPE", "MoDCache", "MoDCausalLMOutput", "MoDConfig", "MoDForCausalLM", "register"]
