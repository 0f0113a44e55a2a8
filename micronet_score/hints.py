"""Hints a model gives the operation counter about what its code cannot show. Outside a count they cost nothing
and change nothing, so a model keeps them in its plain forward.

- :func:`stored_at`: ``stored_at(tensor, bits)`` says that ``tensor`` holds b-bit values: state the model kept
  from an earlier call after quantizing it (a quantized key/value memory, a cache of quantized states), which the
  counter, seeing one forward at a time, cannot trace to its quantizer. Joins, views and gathers of it keep the
  width (:mod:`micronet_score.counting.flow`).
- Regions: ops run inside ``torch.profiler.record_function(name)`` are charged to a row ``<module>.<name>`` of
  the breakdown (the module running it, then the region's name), so parts of one forward that are not modules
  (the terms of an attention) get rows of their own.
- :func:`priced_as`: ``priced_as(fast, reference, *args)`` runs ``fast(*args)`` and, under the counter, prices
  ``reference(*args)`` instead, on meta copies (:mod:`micronet_score.counting.hints`).
- :func:`priced_by_shapes`: ``priced_by_shapes(fn, *args)`` runs ``fn(*args)``; a counter prices it once per
  signature (shapes, widths, other arguments) on meta copies and adds that count on later calls: a block of a
  model evaluated chunk after chunk costs the counter's per-op work once per shape.
- ``unquantized``: a module attribute naming some of its own parameters (``("weight", "bias")``) that a declared
  ``bits`` does not cover: they are stored at their dtype's width (32 bits for fp32) unless ``weight_bits`` names
  them (a layer norm the authors kept in floating point).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import nn

from micronet_score.errors import MicronetError


class _Listener(Protocol):
    def declare_width(self, tensor: torch.Tensor, bits: int) -> None: ...


LISTENERS: list[_Listener] = []
"""The counting modes running now (innermost last); a counting mode adds itself while it is entered."""


def stored_at(tensor: torch.Tensor, bits: int) -> torch.Tensor:
    """``tensor`` itself; while a count runs, its values count as ``bits``-bit values."""
    if LISTENERS and isinstance(tensor, torch.Tensor):
        LISTENERS[-1].declare_width(tensor, int(bits))
    return tensor


def priced_as(fast: Any, reference: Any, *args: Any) -> Any:
    """``fast(*args)``, priced under a counter as ``reference(*args)`` would be
    (:func:`micronet_score.counting.hints.priced_as`)."""
    from micronet_score.counting.hints import priced_as as run  # the counting machinery, loaded when first used

    return run(fast, reference, *args)


def priced_by_shapes(function: Any, *args: Any) -> Any:
    """``function(*args)`` for a function whose ops depend on the shapes of its arguments, not on their values:
    under a counter it runs at plain speed and is priced on meta copies once per signature (``priced_as`` with
    the function as its own reference; :mod:`micronet_score.counting.hints`)."""
    return priced_as(function, function, *args)


def unquantized_names(modules: Iterable[tuple[str, nn.Module]]) -> frozenset[str]:
    """Full names of the parameters that their modules declare ``unquantized``, over (path, module) pairs."""
    names = set()
    for path, module in modules:
        declared: Any = getattr(module, "unquantized", ())
        if isinstance(declared, str) or not all(isinstance(n, str) for n in declared):
            raise MicronetError(f"module {path or '<root>'}: `unquantized` must name its parameters as a tuple of "
                                f"strings (got {declared!r})")
        for name in declared:
            if name not in module._parameters:
                raise MicronetError(f"module {path or '<root>'} declares {name!r} unquantized, but it has no such "
                                    "parameter")
            names.add(f"{path}.{name}" if path else name)
    return frozenset(names)
