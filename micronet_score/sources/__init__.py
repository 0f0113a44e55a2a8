"""Where a model's architecture and weights come from: one small module per kind of source, each reading its files
without running code from them (see README "Safety and robustness"); :func:`micronet_score.checkpoint.load_model`
is the one place that chooses among them.

- :mod:`.safetensors_io`: ``.safetensors`` files, single or sharded, memory-mapped and read tensor by tensor;
- :mod:`.huggingface`: Hugging Face model directories (``config.json`` and weights), built by ``transformers``;
- :mod:`.factory`: the user's own architecture, ``package.module:factory`` with keyword arguments;
- :mod:`.pt2`: ``torch.export`` programs; :mod:`.config`: configuration files; :mod:`.files`: file checks.
"""
