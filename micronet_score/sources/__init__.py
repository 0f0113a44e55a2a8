"""Where a model's architecture and weights come from: one small module per kind of source.

:func:`micronet_score.checkpoint.load_model` is the one place that chooses among them.

- :mod:`.safetensors_io`: ``.safetensors`` files, single or sharded, memory-mapped and read tensor by tensor;
- :mod:`.huggingface`: Hugging Face model directories (``config.json`` and weights), built by ``transformers``;
- :mod:`.factory`: the user's own architecture, ``package.module:factory`` with keyword arguments.
"""
