"""Pricing hints: a model computes one way and is priced as another.

A model may have a fast computation (a fused loop, a streaming normaliser) of the same values as a plainer
*reference* computation whose ops are the ones the rule set should price. ``priced_as(fast, reference, *args)``
returns ``fast(*args)``:

* outside any dispatch mode (plain evaluation) it just runs ``fast(*args)`` (on real tensors);
* under the counter (:class:`~micronet_score.counting.interpreter.CountingMode`), ``fast(*args)`` runs outside
  the dispatch and function modes (unpriced, at plain speed), and ``reference(*args)`` is priced by running it
  on meta copies (same shapes, strides and dtypes, no values) of the tensors in ``args`` and of the parameters
  and buffers of the module that ``reference`` is a method of. Each copy stands for its real tensor: a weight's
  copy has the weight's stored width and representation, a quantizer-marked activation's copy has its mark, and
  a stored tensor whose copy the reference reads (as a real forward would: a parameter taken by any op, a
  buffer read as an operand or a scale) is stored for inference. The count is the reference's, op by op and
  module by module (its submodules' hooks run as usual), and what runs is the fast computation;
* where an argument is a meta tensor (shape-only counting: nothing to compute) or another dispatch mode is
  active (a different counter, a tracer), ``reference(*args)`` runs, so that what is seen is the reference
  computation.

The reference must be shape-only: its ops may depend on the shapes of its inputs but not on their values (a
``masked_select`` or ``nonzero`` has no meta result to price). So its count is a function of what it is given, and
a :class:`~micronet_score.Counter` prices it once per *signature*: the layouts (shapes, strides, dtypes) and
widths (stored tensor, mark) of the tensors, the other arguments, the train/eval modes of its module, grad and
autocast modes, and where in the model it runs. A call with a signature priced before in the same Counter (and
the same weight table) adds that count again without running the reference: a model evaluated chunk after chunk
pays the counter's per-op work once per shape. The reference must therefore not depend on Python state outside
its arguments that changes between calls (a module attribute set between forwards is not seen; a reference that
is a closure, or a method of something other than a module, is priced every call). The fast and reference results
must have the same shapes and dtypes (checked: a mismatch is an internal error, never a silent count). The other
hints a model gives the counter (regions, ``stored_at``, ``unquantized``) are in :mod:`micronet_score.hints`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from micronet_score.counting.interpreter import flat_tensors

T = TypeVar("T")


def priced_as(fast: Callable[..., T], reference: Callable[..., T], *args: Any) -> T:
    """``fast(*args)``, priced under a counter as ``reference(*args)`` would be (see the module docstring)."""
    inputs = flat_tensors(args)
    if any(t.is_meta for t in inputs):
        return reference(*args)
    mode = _get_current_dispatch_mode()
    if mode is None:
        return fast(*args)
    if not hasattr(mode, "hint"):
        return reference(*args)
    owner = getattr(reference, "__self__", None)
    owned = _owned(owner) if isinstance(owner, nn.Module) else []
    held = list({id(t): t for _, _, t in owned}.values())  # a tied tensor once

    def run_reference(copies: list[Tensor]) -> Any:
        meta_args = _replaced(args, iter(copies[: len(inputs)]))
        stand_ins = {id(t): c for t, c in zip(held, copies[len(inputs) :], strict=True)}
        with _swapped(owned, stand_ins):
            return reference(*meta_args)

    return mode.hint(lambda: fast(*args), run_reference, inputs + held, _call_key(reference, owner, args))


def _call_key(reference: Callable[..., Any], owner: Any, args: tuple) -> Any:
    """What a reference's count depends on besides the layouts and widths of its tensors (which the counter adds):
    the function, the module it is a method of and the train/eval modes of that module's tree, the non-tensor
    arguments, grad and autocast modes. None where no key can stand for it: a closure (whose captured values are
    not seen), an argument that cannot be hashed."""
    function = getattr(reference, "__func__", reference)
    if getattr(function, "__closure__", None) or (owner is not None and not isinstance(owner, nn.Module)):
        return None
    modes = tuple(m.training for m in owner.modules()) if isinstance(owner, nn.Module) else ()
    key = (function, owner, modes, _skeleton(args), torch.is_grad_enabled(),
           torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda"))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _skeleton(value: Any) -> Any:
    """``value`` with each tensor replaced by a placeholder, lists as tuples (a hashable picture of the rest)."""
    if isinstance(value, Tensor):
        return Tensor
    if isinstance(value, (list, tuple)):
        return (type(value), *(_skeleton(v) for v in value))
    return value


def _replaced(value: Any, copies: Iterator[Tensor]) -> Any:
    """``value`` with each tensor replaced by the next copy (the order of :func:`flat_tensors`)."""
    if isinstance(value, Tensor):
        return next(copies)
    if isinstance(value, (list, tuple)):
        return type(value)(_replaced(v, copies) for v in value)
    return value


def _owned(module: nn.Module) -> list[tuple[dict, str, Tensor]]:
    """(the dict that holds it, its name, the tensor) for every parameter and buffer of ``module`` and its
    submodules; a tensor held twice (tied weights) is listed at each place."""
    out = []
    for m in module.modules():
        for slots in (m._parameters, m._buffers):
            out.extend((slots, name, t) for name, t in slots.items() if t is not None)
    return out


@contextmanager
def _swapped(owned: list[tuple[dict, str, Tensor]], stand_ins: dict[int, Tensor]) -> Iterator[None]:
    """The module tensors replaced by their stand-ins (by tensor id) while the reference runs."""
    for slots, name, tensor in owned:
        slots[name] = stand_ins[id(tensor)]
    try:
        yield
    finally:
        for slots, name, tensor in owned:
            slots[name] = tensor
