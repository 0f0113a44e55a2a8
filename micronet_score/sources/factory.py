"""The user's own architecture: ``--model package.module:factory`` with ``--model-args '{"json": "kwargs"}'``.

``factory`` is a class or a function returning an ``nn.Module``; ``package.module`` is imported as ``python -m``
would, with the current directory importable. Importing it runs that module's code: the code the user named,
never code from a checkpoint file.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from micronet_score.errors import MicronetError


def is_factory(name: str | None) -> bool:
    """Whether ``--model`` names a factory (``module:attribute``) rather than a bundled architecture."""
    return bool(name) and ":" in name


def parse_args(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """``--model-args``: a JSON object of keyword arguments (or a mapping already)."""
    if text is None:
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise MicronetError(f"--model-args is not valid JSON ({exc}); give an object such as '{{\"width\": 64}}'") \
            from None
    if not isinstance(value, dict):
        raise MicronetError(f"--model-args must be a JSON object of keyword arguments, got {type(value).__name__}")
    return value


def importable_cwd() -> str:
    """Put the current directory on the import path, as ``python -m`` does; returns it."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    return cwd


def resolve(spec: str) -> Callable[..., Any]:
    """The callable ``package.module:attribute`` (attribute may be dotted: ``module:Class.create``)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise MicronetError(f"--model {spec!r}: give package.module:factory (a class or a function)")
    cwd = importable_cwd()
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise MicronetError(f"--model {spec!r}: no module {exc.name!r} importable from {cwd} "
                                "(run from the folder above the package, or install it)") from None
        raise MicronetError(f"--model {spec!r}: importing {module_name} failed ({exc})") from None
    except Exception as exc:
        raise MicronetError(f"--model {spec!r}: importing {module_name} failed ({type(exc).__name__}: {exc})") \
            from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise MicronetError(f"--model {spec!r}: {module_name} has no {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise MicronetError(f"--model {spec!r}: {attribute} is not a class or a function")
    return target


def build(spec: str, args: Mapping[str, Any] | None = None) -> nn.Module:
    """``factory(**args)``, which must give an ``nn.Module``."""
    factory = resolve(spec)
    try:
        model = factory(**dict(args or {}))
    except TypeError as exc:
        raise MicronetError(f"--model {spec!r}: calling it with --model-args {dict(args or {})} failed ({exc})") \
            from None
    if not isinstance(model, nn.Module):
        raise MicronetError(f"--model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model
