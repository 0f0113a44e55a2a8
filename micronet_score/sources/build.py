"""Building an architecture for a checkpoint without letting the checkpoint's configuration exhaust memory.

A configuration comes from the file (or a config file beside it), so it can ask for anything: a network 60 times
wider or 10^9 layers deep than the weights the file holds. The architecture is first built on the ``meta`` device
(shapes only, no memory for values) under a budget, its shapes compared with the file's tensors, and only a model
that fits is built for real. The budget: at most twice as many parameter values as the file holds tensor values
(plus :data:`VALUE_SLACK`; a parameter registered twice, as tied ones are, counts once), and at most
:data:`MODULES_PER_KEY` modules per state-dict key (plus :data:`MODULE_SLACK`), checked as each one is registered,
so that a configuration that would build a huge model stops at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from micronet_score.errors import MicronetError
from micronet_score.sources.config import shown

MODULES_PER_KEY = 8
MODULE_SLACK = 1000
VALUE_SLACK = 1 << 20


class _TooLarge(Exception):
    pass


@contextmanager
def size_budget(state_dict: Mapping[str, Tensor]) -> Iterator[None]:
    """Inside the block, registering more than twice the parameter values ``state_dict`` holds (+ VALUE_SLACK), or
    more modules than MODULES_PER_KEY per key (+ MODULE_SLACK), raises :class:`_TooLarge`."""
    held = sum(t.numel() for t in state_dict.values())
    values = 2 * held + VALUE_SLACK
    modules = MODULES_PER_KEY * len(state_dict) + MODULE_SLACK
    used = {"values": 0, "modules": 0}
    seen: set[int] = set()

    def on_parameter(module: nn.Module, name: str, param: Any):
        if param is not None and id(param) not in seen:
            seen.add(id(param))
            used["values"] += param.numel()
            if used["values"] > values:
                raise _TooLarge(f"more than {values:,} weight values (the file holds {held:,})")

    def on_module(module: nn.Module, name: str, submodule: Any):
        used["modules"] += 1
        if used["modules"] > modules:
            raise _TooLarge(f"more than {modules:,} modules for {len(state_dict):,} tensors")

    handles = [register_module_parameter_registration_hook(on_parameter),
               register_module_module_registration_hook(on_module)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def build_fitting(build: Callable[[dict], nn.Module], config: dict, state_dict: Mapping[str, Tensor],
                  source: str) -> nn.Module:
    """``build(config)`` checked against ``state_dict`` on the meta device first (one error listing every missing,
    unexpected and misshapen key), then built for real (weights not loaded yet)."""
    from micronet_score.checkpoint import check_state_dict

    try:
        with size_budget(state_dict), torch.device("meta"):
            skeleton = build(config)
    except _TooLarge as exc:
        raise MicronetError(f"{source}: its configuration asks for a model with {exc} "
                            f"({_settings(config)}); it does not fit the file") from None
    check_state_dict(skeleton, state_dict, source)
    del skeleton
    return build(config)


def _settings(config: Mapping[str, Any]) -> str:
    items = list(config.items())
    shown_items = ", ".join(f"{k}={shown(v)}" for k, v in items[:8])
    return shown_items + (f" and {len(items) - 8} more" if len(items) > 8 else "")
