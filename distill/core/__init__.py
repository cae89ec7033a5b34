"""Ground floor: what every stage and model shares and nothing else of the
project needs to provide.

``errors`` (the one-line ``UserError``), ``cli`` (flags, config loading,
clean exits), ``layout`` (the ``W/...`` paths), ``files`` (atomic writes),
``configs`` (config sections checked against dataclasses, presets),
``checkpoint`` (model folders and orbax checkpoints) and ``registry``
(loading a model folder by its kind).
"""
