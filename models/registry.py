"""The registry of bundled architectures, by name.

Each architecture module in this package registers itself with :func:`register`; :func:`get` and
:func:`names` import every module of the package first, so that adding an architecture needs no list edited.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from micronet_score.errors import MicronetError

_REGISTRY: dict[str, ModelSpec] = {}


@dataclass(frozen=True)
class ModelSpec:
    """How to build, recognise and feed one bundled architecture."""

    name: str
    title: str
    track: str
    build: Callable[[Mapping[str, Any]], Any]
    """Build the model (an ``nn.Module``) from a configuration mapping."""
    default_config: Mapping[str, Any] = field(default_factory=dict)
    config_from_state_dict: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    """Infer the configuration from a state dict's keys and shapes, where the shapes determine it."""
    example_inputs: Callable[[Any], tuple] | None = None
    """Example inputs for counting without data, given the built model."""
    load: Callable[[Mapping[str, Any]], Any] | None = None
    """Build and load the model from its authors' state dict, where their key format is not the model's own
    (``build`` + ``load_state_dict`` otherwise)."""
    load_settings: tuple[str, ...] = ()
    """Settings that the shapes do not determine, passed from the config file to ``load`` and
    ``config_from_state_dict`` as keyword arguments (e.g. the QRNN's ``splits``)."""
    aliases: tuple[str, ...] = ()


def image_of(track: str) -> Callable[[Any], tuple]:
    """Example inputs of an image track: one image of the input shape the bundled rule set gives the track."""
    from micronet_score.ruleset import load_rules

    shape = load_rules().track(track).input_shape
    if not shape:
        raise ValueError(f"track {track!r} has no input_shape in the bundled rule set")

    def example_inputs(model: Any) -> tuple:
        import torch

        return (torch.zeros(*shape),)

    return example_inputs


def register(spec: ModelSpec) -> ModelSpec:
    for key in (spec.name, *spec.aliases):
        if key in _REGISTRY and _REGISTRY[key] is not spec:
            raise ValueError(f"model name {key!r} registered twice")
        _REGISTRY[key] = spec
    return spec


def _import_all() -> None:
    package = importlib.import_module("micronet_score.models")
    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "registry" and not info.name.startswith("_"):
            importlib.import_module(f"micronet_score.models.{info.name}")


def names() -> list[str]:
    """The names of the bundled architectures (aliases excluded)."""
    _import_all()
    return sorted({spec.name for spec in _REGISTRY.values()})


def get(name: str) -> ModelSpec:
    """The architecture registered as ``name``; a clear error listing the known names otherwise."""
    _import_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MicronetError(f"no bundled model {name!r} (bundled: {', '.join(names()) or 'none'})") from None
