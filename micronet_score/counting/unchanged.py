"""Counting only reads the measured model: every buffer ends bit-identical to how it started.

A forward can write into its model even in evaluation mode: fake quantizers run their observers (``scale``,
``zero_point``, ``min_val``, ``max_val``) whatever the training flag says, plain observers record every input's
range, batch norm in training mode updates its running statistics and ``num_batches_tracked``, and a user's
module may keep any state it likes. While counting, fake quantizers' observers are switched off (the forward
then quantizes with the stored parameters, as the deployed model does), and afterwards every buffer is put back:
the same tensor object under the same name, holding the same bits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


@contextmanager
def model_unchanged(model: nn.Module) -> Iterator[None]:
    """Run the block with fake-quantizer observers off, then restore every buffer of ``model`` (object and
    values); what the block changed in parameters is left alone (counting never writes them)."""
    saved = _snapshot(model)
    _observers_off(model)
    try:
        yield
    finally:
        _restore(saved)


def _snapshot(model: nn.Module) -> list[tuple[nn.Module, str, Tensor | None, Tensor | None]]:
    saved = []
    for module in model.modules():
        for name, buffer in module._buffers.items():
            copy = None if buffer is None or buffer.is_meta else buffer.detach().clone()
            saved.append((module, name, buffer, copy))
    return saved


def _observers_off(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.ao.quantization.FakeQuantizeBase):
            module.disable_observer()  # its observer_enabled flag is a buffer: restored with the others


def _restore(saved) -> None:
    with torch.no_grad():
        for module, name, buffer, copy in saved:
            if module._buffers.get(name) is not buffer:
                module._buffers[name] = buffer
            if copy is None or buffer is None or _identical(buffer, copy):
                continue  # untouched buffers keep their version counter
            if buffer.shape != copy.shape or buffer.dtype != copy.dtype:
                buffer.set_(copy)
            else:
                buffer.copy_(copy)


def _identical(a: Tensor, b: Tensor) -> bool:
    """Bit-identical (NaN payloads and -0.0 included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    try:
        return bool(torch.equal(_bits(a), _bits(b)))
    except (RuntimeError, TypeError):  # quantized and other exotic tensors: compare values
        return bool(torch.equal(a, b))


def _bits(t: Tensor) -> Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)
