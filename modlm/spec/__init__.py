"""The bottom floor: modlm's torch-free vocabulary.

Block kinds (``kinds``), the router registry (``routers``), parameter roles (``roles``), the
capacity rule (``capacity``), typed KEY=VALUE reading (``fields``) and the small registry they
are built on (``registry``). Everything above (config, model, routing, inference, training ...)
may import these; these import nothing of modlm but ``modlm.validation``, so config validation
and ``--help`` stay instant and no floor needs a higher one to name a kind, router or role.
"""
