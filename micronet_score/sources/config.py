"""Configuration files (the authors' ``config.yaml``, or JSON): read safely and bounded.

YAML is read with the safe loader (plain data only). A file is at most :data:`MAX_CONFIG_BYTES`; once loaded it
may expand (through YAML aliases, which share one object among many places) to at most :data:`MAX_VALUES`
values, so that no later step (a comparison, an error message) walks an exponential structure. Values quoted
in messages are cut short by :func:`shown`.
"""

from __future__ import annotations

import os
import reprlib
from collections.abc import Mapping
from typing import Any

from micronet_score.errors import MicronetError
from micronet_score.sources.files import regular_file

MAX_CONFIG_BYTES = 1 << 20
MAX_VALUES = 100_000

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong, _SHORT.maxdict, _SHORT.maxlist = 2, 60, 60, 40, 4, 4


def shown(value: Any) -> str:
    """``repr(value)``, at most a few dozen characters whatever the value holds (nested or shared parts)."""
    return _SHORT.repr(value)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML (or JSON) mapping, such as the authors' ``config.yaml``; one clear error for anything else."""
    import yaml

    path = regular_file(path, "config")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise MicronetError(f"{path}: {size:,} bytes, not a config file (at most {MAX_CONFIG_BYTES:,})")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MicronetError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                            f"{exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MicronetError(f"{path}: not valid YAML ({str(exc).splitlines()[0][:200]})") from None
    except RecursionError:
        raise MicronetError(f"{path}: not valid YAML (nested too deeply)") from None
    except ValueError as exc:  # an integer of thousands of digits
        raise MicronetError(f"{path}: not valid YAML ({str(exc)[:200]})") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise MicronetError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    if _expands_beyond(data, MAX_VALUES):
        raise MicronetError(f"{path}: its settings expand to more than {MAX_VALUES:,} values (YAML aliases "
                            "repeated inside each other?); not a config file")
    return dict(data)


def _expands_beyond(data: Any, limit: int) -> bool:
    """Whether walking ``data`` (every reference followed, as a copy or a comparison would) visits more than
    ``limit`` values; stops as soon as it does."""
    stack, seen = [data], 0
    while stack:
        value = stack.pop()
        seen += 1
        if seen > limit:
            return True
        if isinstance(value, Mapping):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple, set)):
            stack.extend(value)
    return False
