"""Compute kernels below the model: the optional native few-row CPU linear (``fewrow``).

A floor of its own under ``modlm.model``: ``model.layers.Linear`` calls into it, and the decode
code above may turn it on or off, but it imports nothing of modlm, so the model depends on no
inference code to run its matrix products.
"""
