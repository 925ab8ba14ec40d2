"""Adapting a pretrained (converted) dense model to Mixture-of-Depths: ``modlm adapt``.

Take a dense checkpoint (``modlm convert`` output), put routers on chosen layers, freeze every
pretrained weight, train only the routing machinery on a text sample at the target capacity,
then calibrate the causal thresholds so decoding routes that capacity.

- ``modlm.adapt.config``: ``AdaptConfig`` (the defaults and why), ``ADAPT_ROUTERS``,
  ``default_layers``, ``parse_layers`` (``--layers 14-28``).
- ``modlm.adapt.routers``: ``adapted_config``, ``adapt_model`` (routers on a frozen copy that
  starts out computing what the dense model does), ``with_routers`` (an untrained routed copy).
- ``modlm.adapt.layers``: which layers matter: ``block_influence`` (ShortGPT),
  ``least_influential_layers``, and the layer-removal baseline ``remove_layers``.
- ``modlm.adapt.tune``: ``tune_routers`` (the training loop, made of the trainer's pieces:
  optimizer groups and clipping by parameter role, window sampling) and ``adapt_checkpoint``
  (checkpoint in, adapted checkpoint out).

The adaptation study (``modlm adapt-study``) lives in ``modlm.experiments.adapt_study``.
"""
