"""Hugging Face model directories: ``config.json`` beside ``model.safetensors`` (or its sharded index), or
``pytorch_model.bin``.

The architecture is built by ``transformers`` from ``config.json`` alone: local files only (never the network),
never ``trust_remote_code`` (a directory's own Python code is not run). The class is the config's first
``architectures`` entry when ``transformers`` has it, else the causal-LM class of the model type, else the base
model. ``transformers`` is the optional extra ``micronet-score[hf]``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from micronet_score.errors import MicronetError, first_line
from micronet_score.sources import safetensors_io
from micronet_score.sources.build import size_budget

CONFIG = "config.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (safetensors_io.INDEX, safetensors_io.SINGLE, BIN_INDEX, BIN)


def is_model_directory(path: str | os.PathLike) -> bool:
    """A directory with ``config.json`` and weights in one of the files Hugging Face saves."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG).is_file() and any((path / name).is_file() for name in WEIGHT_FILES)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MicronetError("a Hugging Face model directory needs transformers: pip install 'micronet-score[hf]'") \
            from None
    return transformers


def read_config(directory: str | os.PathLike):
    """The directory's ``config.json`` as a ``transformers`` config (local, no remote code)."""
    transformers = _transformers()
    directory = Path(directory)
    try:
        return transformers.AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise MicronetError(f"{directory / CONFIG}: transformers cannot build a config from it "
                            f"({first_line(exc)})") from None


def _model_classes(config) -> list[type]:
    """The classes that may build this config: its ``architectures`` first, then every auto class's."""
    transformers = _transformers()
    classes = [getattr(transformers, name, None) for name in getattr(config, "architectures", None) or ()]
    # the lazy module's names without dir(transformers), which takes ~0.4 s (a quadratic merge of its __all__)
    known = {*vars(transformers), *getattr(transformers, "__all__", ())}
    autos = sorted(name for name in known if name.startswith("AutoModelFor")) + ["AutoModel"]
    for auto in autos:
        try:
            classes.append(getattr(transformers, auto)._model_mapping[type(config)])
        except (AttributeError, KeyError, ValueError):
            continue
    found = list(dict.fromkeys(c for c in classes if isinstance(c, type) and issubclass(c, nn.Module)))
    if not found:
        raise MicronetError(f"transformers has no model class for {type(config).__name__} "
                            f"(architectures: {getattr(config, 'architectures', None)})")
    return found


def _model_class(config, names: set[str] | None = None) -> type:
    """The config's class: the first whose state-dict keys are the weights' (``names``), else the first."""
    classes = _model_classes(config)
    if names is None or len(classes) == 1:
        return classes[0]
    from micronet_score.checkpoint import tied_keys

    for cls in classes:
        try:
            with torch.device("meta"):
                model = cls._from_config(config)
        except Exception:
            continue
        keys, aliases = set(model.state_dict()), tied_keys(model)
        if names <= keys and all(k in names or aliases.get(k) in names for k in keys):
            return cls
    return classes[0]


def build_model(directory: str | os.PathLike, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None, names: set[str] | None = None) -> nn.Module:
    """The directory's architecture with freshly initialised weights (none read), in eval mode. On the ``meta``
    device nothing is allocated (for counting from shapes, or to stream weights in afterwards). The class is the
    config's ``architectures`` entry, else (or when given the weights' tensor ``names``, the first whose keys they
    are) the first auto class that has one for the config."""
    config = read_config(directory)
    cls = _model_class(config, names)
    try:
        with torch.device(device):
            model = cls._from_config(config, dtype=dtype) if dtype is not None else cls._from_config(config)
    except Exception as exc:
        raise MicronetError(f"{directory}: transformers could not build {cls.__name__} ({first_line(exc)})") \
            from None
    return model.eval()


def weights(directory: str | os.PathLike) -> Any:
    """The directory's weights: a lazy safetensors mapping, or a state dict read with ``weights_only=True``."""
    from micronet_score.checkpoint import read_file, split_state_dict

    directory = Path(directory)
    if (directory / safetensors_io.INDEX).is_file() or (directory / safetensors_io.SINGLE).is_file():
        return safetensors_io.SafetensorsWeights(directory)
    if (directory / BIN_INDEX).is_file():
        try:
            shards = sorted(set(json.loads((directory / BIN_INDEX).read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError):
            raise MicronetError(f"{directory / BIN_INDEX}: not a weights index (no weight_map)") from None
        state_dict: dict[str, torch.Tensor] = {}
        for shard in shards:
            state_dict.update(split_state_dict(read_file(directory / shard), str(directory / shard))[0])
        return state_dict
    return split_state_dict(read_file(directory / BIN), str(directory / BIN))[0]


def _dtype_of(state_dict: Any) -> torch.dtype | None:
    """The floating dtype most of the stored values have (the model is built in it, so storage counts it)."""
    sizes: dict[torch.dtype, int] = {}
    if isinstance(state_dict, safetensors_io.SafetensorsWeights):
        names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
        for entry in state_dict.entries().values():
            if entry.dtype in names:
                sizes[names[entry.dtype]] = sizes.get(names[entry.dtype], 0) + _numel(entry.shape)
    else:
        for tensor in state_dict.values():
            if tensor.is_floating_point():
                sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.numel()
    return max(sizes, key=sizes.get) if sizes else None


def _meta_tensors(state_dict: Any) -> dict[str, torch.Tensor]:
    """The weights as meta tensors of their shapes (read from the headers for safetensors)."""
    if isinstance(state_dict, safetensors_io.SafetensorsWeights):
        return {name: torch.empty(shape, device="meta") for name, shape in state_dict.shapes().items()}
    return dict(state_dict)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def load(directory: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a Hugging Face directory with its weights, and its configuration as a plain mapping."""
    from micronet_score.checkpoint import load_weights

    state_dict = weights(directory)
    dtype, names = _dtype_of(state_dict), set(state_dict)
    # config.json can ask for any size: built on meta first, within a budget set by the values the files hold
    with size_budget(_meta_tensors(state_dict)):
        build_model(directory, "meta", dtype=dtype, names=names)
    model = build_model(directory, dtype=dtype, names=names)
    load_weights(model, state_dict, str(directory))
    return model, model.config.to_dict()

