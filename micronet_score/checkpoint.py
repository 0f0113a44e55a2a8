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
import tempfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from micronet_score.errors import MicronetError
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
    one clear error for a missing, empty, damaged or unsafe file."""
    path = _checkpoint_file(path)
    if path.stat().st_size == 0:
        raise MicronetError(f"{path}: empty file (0 bytes), not a checkpoint")
    check_zip_sizes(path, path.stat().st_size, str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise MicronetError(f"{path}: not loaded: {PICKLE_HINT}") from None
        raise MicronetError(f"{path}: not a PyTorch checkpoint, or damaged ({_first_line(exc)})") from None
    except Exception as exc:
        raise MicronetError(f"{path}: not a PyTorch checkpoint, or damaged ({_first_line(exc)})") from None


def _checkpoint_file(path: str | os.PathLike) -> Path:
    """The path of an existing checkpoint file, or one clear error (a directory is not one)."""
    return regular_file(path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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


def fit_problems(
    expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, Tensor], allowed: Collection[str] = ()
) -> list[str]:
    """Every missing, unexpected and misshapen key, all of them, grouped: ``"2 missing: a [3], b [4]"``,
    ``"1 unexpected: c"``, ``"1 misshapen: d [5] (expected [4])"``; empty when the state dict fits. A [1] tensor fits
    a 0-d one (``load_state_dict`` takes it); ``allowed`` are extra keys that are not unexpected."""
    missing = [f"{k} {list(shape)}" for k, shape in expected.items() if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected and k not in allowed]
    misshapen = []
    for key, shape in expected.items():
        if key in state_dict:
            got = tuple(state_dict[key].shape)
            if got != tuple(shape) and not (tuple(shape) == () and got == (1,)):
                misshapen.append(f"{key} {list(got)} (expected {list(shape)})")
    return [
        f"{len(keys)} {label}: {', '.join(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen))
        if keys
    ]


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """One error listing every missing, unexpected and misshapen key (see :func:`fit_problems`)."""
    problems = fit_problems({k: tuple(v.shape) for k, v in model.state_dict().items()}, state_dict)
    if problems:
        raise MicronetError(f"{source} does not fit the model: " + "; ".join(problems))


def load_weights(model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Check, then load in the model's key order (so that, of tied keys, the later one wins)."""
    check_state_dict(model, state_dict, source)
    own = model.state_dict()
    ordered = {k: state_dict[k].reshape(own[k].shape).to(own[k].dtype) for k in own}
    model.load_state_dict(ordered, strict=True)


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
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a micronet-score checkpoint (not a foreign file: see :func:`load_model`)."""
    obj = read_file(path)
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
        raise MicronetError(f"name the architecture of this checkpoint ({found})")
    return accepted[0]


def load_model(
    path: str | os.PathLike,
    model: str | None = None,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    trust_pickle: bool = False,
) -> LoadedModel:
    """Any checkpoint micronet-score accepts, as a model in eval mode; the one place files are resolved.

    - a micronet-score checkpoint (architecture, configuration and weights in one file);
    - an authors' file of a bundled architecture (``{'net': sd, 'step': n}``, a raw state dict, or their own key
      format): the architecture is ``model`` or the one bundled architecture that recognises the keys; the
      shapes give what they determine, ``config`` (their ``config.yaml``, or a mapping) and ``overrides`` the rest;
    - a ``torch.export`` program (``.pt2``): any exported model, no class definition needed;
    - a fully pickled ``nn.Module``, only with ``trust_pickle`` (loading a pickle runs code from the file).
    """
    from micronet_score.models import registry

    source = str(path)
    if Path(path).suffix == ".pt2":
        return load_program(path, device, trust_pickle)
    obj = read_file(path, trust_pickle=trust_pickle)
    if isinstance(obj, nn.Module):
        obj.to(device).eval()
        return LoadedModel("pickled module", obj, {}, {"source": source, "class": type(obj).__qualname__})
    file_config = read_config_file(config) if isinstance(config, (str, os.PathLike)) else dict(config or {})
    if is_micronet_checkpoint(obj):
        ckpt = load_checkpoint(path)
        name, state_dict, meta, stated = model or ckpt.model, ckpt.state_dict, ckpt.meta, {**ckpt.config, **file_config}
    else:
        state_dict, meta = split_state_dict(obj, source)
        name, stated = model or recognise(state_dict, {**file_config, **(overrides or {})}), file_config
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
        raise MicronetError(f"{source}: does not load as {spec.name} ({_first_line(exc)})") from None
    net.to(device).eval()
    return LoadedModel(spec.name, net, cfg, {"source": source, **meta})
