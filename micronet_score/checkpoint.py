"""Reading and writing checkpoints, safely (``torch.load(weights_only=True)`` only).

Two kinds of file load:

* micronet-score's own, self-describing checkpoint: ``{"format": "micronet-score", "version": 1, "model": name,
  "config": {...}, "state_dict": {...}, "meta": {...}}``;
* foreign files: a raw state dict, or a training checkpoint ``{"net": state_dict, "step": n, ...}``. The bundled
  architecture is named by the caller (or recognised when exactly one architecture accepts the keys); the
  hyperparameters that the shapes determine are inferred, the rest come from a config file (YAML/JSON) and overrides.

A state dict that does not fit the model fails with one error listing every missing, unexpected and misshapen key.
"""

from __future__ import annotations

import os
import pickle
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from micronet_score.errors import MicronetError, first_line
from micronet_score.sources.build import build_fitting
from micronet_score.sources.config import read_config_file, shown
from micronet_score.sources.files import check_zip_sizes, regular_file
from micronet_score.sources.pt2 import load_program

FORMAT = "micronet-score"
VERSION = 1
STATE_DICT_KEYS = ("net", "state_dict", "model_state_dict")
"""Keys under which training checkpoints keep the state dict."""


@dataclass
class Checkpoint:
    """A micronet-score checkpoint in memory."""

    model: str
    config: dict[str, Any]
    state_dict: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedModel:
    """A built model with its weights, its configuration and where it came from.

    ``name`` is the bundled architecture's name, or ``"torch.export"`` / ``"pickled module"`` for models that carry
    their own code; ``example_inputs`` are the inputs a ``.pt2`` program was exported with.
    """

    name: str
    model: nn.Module
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    example_inputs: tuple | None = None

    @property
    def spec(self):
        """The bundled architecture's registry entry, or None for models that carry their own code."""
        from micronet_score.models import registry

        return registry.get(self.name) if self.name in registry.names() else None


PICKLE_HINT = (
    "it holds pickled Python objects (for example a whole model), and loading it would run code from the file; "
    "if you trust the file, pass --trust-pickle (trust_pickle=True), or save a state dict instead"
)


def read_file(path: str | os.PathLike, trust_pickle: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` onto the CPU (arbitrary unpickling only with ``trust_pickle``);
    one clear error for a missing, empty, damaged or unsafe file, or one that is no PyTorch file at all."""
    path = _checkpoint_file(path)
    if path.stat().st_size == 0:
        raise MicronetError(f"{path}: empty file (0 bytes), not a checkpoint")
    check_zip_sizes(path, path.stat().st_size, str(path))
    if not _looks_like_torch_save(path):
        raise MicronetError(f"{path}: not a PyTorch checkpoint (neither a torch.save file nor safetensors)")
    if trust_pickle:  # a pickled module's class is imported by name, from where the user runs
        from micronet_score.sources.factory import importable_cwd

        importable_cwd()
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except ModuleNotFoundError as exc:
        raise MicronetError(f"{path}: the pickled objects' classes come from module {exc.name!r}, which is not "
                            "importable here (run from the folder that holds it, or install it)") from None
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise MicronetError(f"{path}: not loaded: {PICKLE_HINT}") from None
        raise MicronetError(f"{path}: not a PyTorch checkpoint, or damaged ({first_line(exc)})") from None
    except Exception as exc:
        raise MicronetError(f"{path}: not a PyTorch checkpoint, or damaged ({first_line(exc)})") from None


def _looks_like_torch_save(path: Path) -> bool:
    """A zip archive (``torch.save`` since 1.6) or a pickle stream (the legacy format), by the first bytes."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK") or head[:1] == b"\x80"


def _checkpoint_file(path: str | os.PathLike) -> Path:
    """The path of an existing checkpoint file, or one clear error (see :func:`not_a_checkpoint_directory`)."""
    if Path(path).is_dir():
        raise not_a_checkpoint_directory(Path(path))
    return regular_file(path)


def not_a_checkpoint_directory(path: Path) -> MicronetError:
    return MicronetError(
        f"{path}: a directory, not a checkpoint file; a directory loads when it is a Hugging Face model directory "
        "(config.json beside model.safetensors, its index, or pytorch_model.bin), else give the weights file"
    )


def is_micronet_checkpoint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == FORMAT


def split_state_dict(obj: Any, source: str = "checkpoint") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict, metadata) of a raw state dict or a ``{"net": ..., "step": ...}`` training checkpoint."""
    if not isinstance(obj, Mapping):
        raise MicronetError(f"{source}: expected a state dict or a dict with 'net', got {type(obj).__name__}")
    for key in STATE_DICT_KEYS:
        if isinstance(obj.get(key), Mapping):
            meta = {k: v for k, v in obj.items() if k != key and isinstance(v, (int, float, str, bool))}
            return _tensors(obj[key], source), meta
    return _tensors(obj, source), {}


def _tensors(sd: Mapping[str, Any], source: str) -> dict[str, Tensor]:
    """A state dict: tensors, or (for formats such as {'model': sd, 'criterion': sd}) mappings of tensors."""
    bad = [k for k, v in sd.items() if not (isinstance(v, Tensor) or _all_tensors(v))]
    if bad:
        raise MicronetError(f"{source}: not a state dict (non-tensor entries: {', '.join(map(str, bad[:5]))})")
    return dict(sd)


def _all_tensors(value: Any) -> bool:
    """A mapping of tensors; it may be empty (awd-lstm's criterion without splits has no parameters)."""
    return isinstance(value, Mapping) and all(isinstance(v, Tensor) for v in value.values())


SHOWN = 5
"""Keys of each kind that a fit problem names (then a count of the rest)."""


def fit_problems(
    expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, Any], allowed: Collection[str] = (),
    aliases: Mapping[str, str] | None = None,
) -> list[str]:
    """The missing, unexpected and misshapen keys, grouped, each group a count and its first few keys:
    ``"2 missing: a [3], b [4]"``, ``"1 unexpected: c"``, ``"1 misshapen: d [5] (expected [4])"``; empty when the
    state dict fits. A [1] tensor fits a 0-d one (``load_state_dict`` takes it); ``allowed`` are extra keys that
    are not unexpected; ``aliases`` maps a key to another holding the same tensor (tied weights: one is enough).
    The shapes come from ``state_dict.shapes()`` where it has one (nothing is loaded), else from its tensors."""
    shapes = state_dict.shapes() if callable(getattr(state_dict, "shapes", None)) else {
        k: tuple(v.shape) for k, v in state_dict.items()}
    aliases = aliases or {}
    missing = [f"{k} {list(shape)}" for k, shape in expected.items()
               if k not in shapes and aliases.get(k) not in shapes]
    unexpected = [k for k in shapes if k not in expected and k not in allowed]
    misshapen = []
    for key, shape in expected.items():
        if key in shapes:
            got = tuple(shapes[key])
            if got != tuple(shape) and not (tuple(shape) == () and got == (1,)):
                misshapen.append(f"{key} {list(got)} (expected {list(shape)})")
    return [
        f"{len(keys)} {label}: {', '.join(keys[:SHOWN])}" + (f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN
                                                              else "")
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen))
        if keys
    ]


def tied_keys(model: nn.Module) -> dict[str, str]:
    """Each state-dict key whose tensor another key also holds (tied weights), mapped to the first such key."""
    first: dict[int, str] = {}
    aliases = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        owner = first.setdefault(id(tensor), key)
        if owner != key:
            aliases[key] = owner
            aliases.setdefault(owner, key)
    return aliases


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Any], source: str = "checkpoint") -> None:
    """One error naming the missing, unexpected and misshapen keys (see :func:`fit_problems`)."""
    problems = fit_problems({k: tuple(v.shape) for k, v in model.state_dict().items()}, state_dict,
                            aliases=tied_keys(model))
    if problems:
        raise MicronetError(f"{source} does not fit the model: " + "; ".join(problems))


def load_weights(model: nn.Module, state_dict: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Check, then copy tensor by tensor in the model's key order (so that, of tied keys, the later one wins; a
    lazy mapping such as safetensors is read one tensor at a time). A tied key the file leaves out takes its
    twin's value."""
    check_state_dict(model, state_dict, source)
    aliases = tied_keys(model)
    own = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, target in own.items():
            value = state_dict[key] if key in state_dict else state_dict[aliases[key]]
            if target.is_meta:
                raise MicronetError(f"{source}: cannot load weights into a model on the meta device")
            target.copy_(value.reshape(target.shape).to(target.dtype))


def resolve_config(
    defaults: Mapping[str, Any],
    inferred: Mapping[str, Any],
    file_config: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    source: str = "checkpoint",
) -> dict[str, Any]:
    """defaults < config file (its known keys; others such as ``lr`` are ignored) < overrides; the values the
    shapes determine (``inferred``) win over defaults and must agree with what the file or overrides say."""
    file_config = {k: v for k, v in (file_config or {}).items() if k in defaults}
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise MicronetError(f"unknown settings {unknown} (known: {sorted(defaults)})")
    stated = {**file_config, **overrides}
    conflicts = [
        f"{k} = {shown(stated[k])} but the checkpoint's shapes say {shown(v)}"
        for k, v in inferred.items()
        if k in stated and _plain(stated[k]) != _plain(v)
    ]
    if conflicts:
        raise MicronetError(f"{source}: " + "; ".join(conflicts))
    return {**dict(defaults), **stated, **dict(inferred)}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(
    path: str | os.PathLike,
    model: str,
    config: Mapping[str, Any],
    state_dict: Mapping[str, Tensor],
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write a self-describing micronet-score checkpoint atomically (temporary file + rename)."""
    path = Path(path)
    obj = {
        "format": FORMAT,
        "version": VERSION,
        "model": model,
        "config": dict(config),
        "state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()},
        "meta": dict(meta or {}),
    }
    write_atomic(path, lambda f: torch.save(obj, f))
    return path


def write_atomic(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it into place. The temporary file is
    created inside the block that removes it, so that an interrupt at any point (even between its creation and
    the first write) leaves no temporary file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a micronet-score checkpoint (not a foreign file: see :func:`load_model`)."""
    return _micronet_checkpoint(read_file(path), path)


def _micronet_checkpoint(obj: Any, path: str | os.PathLike) -> Checkpoint:
    """The checkpoint a file's object holds, checked (the file is read once, by the caller)."""
    if not is_micronet_checkpoint(obj):
        raise MicronetError(f"{path}: not a micronet-score checkpoint (no format: {FORMAT!r})")
    if obj.get("version") != VERSION:
        raise MicronetError(f"{path}: micronet-score checkpoint version {obj.get('version')!r} (this reads {VERSION})")
    missing = [k for k in ("model", "config", "state_dict") if k not in obj]
    if missing:
        raise MicronetError(f"{path}: micronet-score checkpoint without {', '.join(missing)}")
    state_dict = _tensors(obj["state_dict"], str(path))
    return Checkpoint(obj["model"], dict(obj["config"]), state_dict, dict(obj.get("meta") or {}))


def _settings(spec, stated: Mapping[str, Any]) -> dict[str, Any]:
    """The stated settings that the architecture's loader takes (those its shapes do not determine)."""
    return {key: stated[key] for key in spec.load_settings if key in stated}


def recognise(state_dict: Mapping[str, Tensor], stated: Mapping[str, Any] | None = None) -> str:
    """The one bundled architecture whose shape inference accepts this state dict (given the stated settings)."""
    from micronet_score.models import registry

    accepted = []
    for name in registry.names():
        spec = registry.get(name)
        if spec.config_from_state_dict is None:
            continue
        try:
            spec.config_from_state_dict(state_dict, **_settings(spec, stated or {}))
        except Exception:
            continue
        accepted.append(name)
    if len(accepted) != 1:
        found = f"it fits {', '.join(accepted)}" if accepted else "no bundled architecture recognises its keys"
        raise MicronetError(f"name the architecture of this checkpoint ({found}): {WAYS_TO_NAME}")
    return accepted[0]


WAYS_TO_NAME = (
    "--model NAME for a bundled architecture (see `micronet-score models`); --model package.module:factory "
    "(with --model-args '{\"key\": value}') for your own class or function; or save it as a Hugging Face "
    "directory (config.json beside the weights), a torch.export program (.pt2), or a whole module "
    "(torch.save(model), loaded with --trust-pickle)"
)


def load_model(
    path: str | os.PathLike,
    model: str | None = None,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    trust_pickle: bool = False,
    model_args: str | Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Any checkpoint micronet-score accepts, as a model in eval mode; the one place sources are resolved.

    - a micronet-score checkpoint (architecture, configuration and weights in one file);
    - a state dict (raw, in a training checkpoint ``{'net': sd, 'step': n}``, or a ``.safetensors`` file, single or
      sharded) of the user's own architecture, ``model="package.module:factory"`` called with ``model_args``;
    - an authors' file of a bundled architecture (the same forms, or their own key format): the architecture is
      ``model`` or the one bundled architecture that recognises the keys; the shapes give what they determine,
      ``config`` (their ``config.yaml``, or a mapping) and ``overrides`` the rest;
    - a Hugging Face model directory (``config.json`` and its weights), built by ``transformers``;
    - a ``torch.export`` program (``.pt2``): any exported model, no class definition needed;
    - a fully pickled ``nn.Module``, only with ``trust_pickle`` (loading a pickle runs code from the file).
    """
    from micronet_score.sources import factory, huggingface, safetensors_io

    path, source = Path(path), str(path)
    if path.is_dir():
        if not huggingface.is_model_directory(path):
            raise not_a_checkpoint_directory(path)
        _no_model_for(source, "a Hugging Face directory builds its architecture from config.json", model)
        net, cfg = huggingface.load(path)
        return _ready(LoadedModel(type(net).__name__, net, cfg, {"source": source}), device)
    if path.suffix == ".pt2":
        _no_model_for(source, "a torch.export program carries its own graph", model)
        return load_program(path, device, trust_pickle)
    if safetensors_io.is_safetensors(_checkpoint_file(path)):
        weights = safetensors_io.SafetensorsWeights(path)
        state_dict: Mapping[str, Any] = weights
        meta: dict[str, Any] = dict(weights.metadata)
        obj = None
    else:
        obj = read_file(path, trust_pickle=trust_pickle)
        if isinstance(obj, nn.Module):
            _no_model_for(source, "the file holds a whole pickled module", model)
            return _ready(LoadedModel("pickled module", obj, {}, {"source": source,
                                                                 "class": type(obj).__qualname__}), device)
    if factory.is_factory(model):
        if obj is not None:
            state_dict, meta = split_state_dict(obj, source)
        args = factory.parse_args(model_args)
        net = factory.build(model, args)
        load_weights(net, state_dict, source)
        return _ready(LoadedModel(model, net, args, {"source": source, **meta}), device)
    if model_args is not None:
        raise MicronetError("--model-args is for your own architecture (--model package.module:factory)")
    if obj is None:
        state_dict = weights.load()
    file_config = read_config_file(config) if isinstance(config, (str, os.PathLike)) else dict(config or {})
    if is_micronet_checkpoint(obj):
        ckpt = _micronet_checkpoint(obj, path)
        name, state_dict, meta, stated = model or ckpt.model, ckpt.state_dict, ckpt.meta, {**ckpt.config, **file_config}
    else:
        if obj is not None:
            state_dict, meta = split_state_dict(obj, source)
        name, stated = model or recognise(state_dict, {**file_config, **(overrides or {})}), file_config
    return _ready(_load_bundled(name, state_dict, stated, overrides, source, meta), device)


def _no_model_for(source: str, why: str, model: str | None) -> None:
    if model is not None:
        raise MicronetError(f"{source}: --model {model} does not apply: {why} (leave --model out)")


def _ready(loaded: LoadedModel, device: str | torch.device) -> LoadedModel:
    loaded.model.to(device).eval()
    return loaded


def _load_bundled(name: str, state_dict: Mapping[str, Tensor], stated: Mapping[str, Any],
                  overrides: Mapping[str, Any] | None, source: str, meta: Mapping[str, Any]) -> LoadedModel:
    """A bundled architecture built and loaded from a state dict, its settings from the shapes, the file's
    configuration and the overrides."""
    from micronet_score.models import registry

    spec = registry.get(name)
    try:
        if spec.load is not None:
            settings = _settings(spec, {**stated, **(overrides or {})})
            net = spec.load(state_dict, **settings)
            cfg = dict(spec.config_from_state_dict(state_dict, **settings)) if spec.config_from_state_dict else {}
        else:
            inferred = spec.config_from_state_dict(state_dict) if spec.config_from_state_dict else {}
            cfg = resolve_config(spec.default_config, inferred, stated, overrides, source)
            given = {**stated, **(overrides or {}), **inferred}
            meta = {**meta, "assumed": {k: v for k, v in spec.default_config.items() if k not in given}}
            net = build_fitting(spec.build, cfg, state_dict, source)
            load_weights(net, state_dict, source)
    except MicronetError:
        raise
    except Exception as exc:
        raise MicronetError(f"{source}: does not load as {spec.name} ({first_line(exc)})") from None
    return LoadedModel(spec.name, net, cfg, {"source": source, **meta})
