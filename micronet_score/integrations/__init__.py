"""Trainer integrations: callbacks that log what a model costs at inference, now (its MicroNet score, storage
and operations), through the trainer's own loggers while it trains.

- :mod:`micronet_score.integrations.huggingface`: a ``transformers`` ``TrainerCallback`` (extra ``[hf]``);
- :mod:`micronet_score.integrations.lightning`: a PyTorch Lightning ``Callback`` (extra ``[lightning]``).

Both are a few lines over :meth:`micronet_score.Counter.snapshot`, shared here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from micronet_score.counting import Counter
from micronet_score.report import Report

PREFIX = "micronet/"


def logged_values(report: Report, prefix: str = PREFIX) -> dict[str, float]:
    """What a callback logs: score (when the report has a track), storage and operations per sample/token."""
    values = {f"{prefix}storage": report.params, f"{prefix}operations": report.flops}
    if report.score is not None:
        values[f"{prefix}score"] = report.score
    return values


class Snapshots:
    """Inference snapshots of one model on one example input, with the counter (and its meta copy) kept
    between calls.

    ``inputs``: the example input, a tensor, a tuple of positional inputs, or a mapping of keyword inputs
    (``{"input_ids": ids}`` for a Hugging Face model). ``options``: :class:`Counter`'s (track, bits, ...)."""

    def __init__(self, inputs: Any, samples: float | None = None, shape_only: bool = False, **options: Any) -> None:
        if isinstance(inputs, Mapping):
            self.args, self.kwargs = (), dict(inputs)
        elif isinstance(inputs, (tuple, list)):
            self.args, self.kwargs = tuple(inputs), {}
        else:
            self.args, self.kwargs = (inputs,), {}
        self.samples = samples
        self.shape_only = shape_only
        self.options = options
        self.counter: Counter | None = None

    def report(self, model: nn.Module, shared: tuple[Any, ...] = ()) -> Report:
        """The model's inference cost now (its training state untouched)."""
        if self.counter is None or self.counter.model is not model:
            self.counter = Counter(model, **self.options)
            self.counter._shared = shared
        args, kwargs = self.args, self.kwargs
        if not self.shape_only:  # the real model runs: the example goes where the model is
            device = next((p.device for p in model.parameters()), None)
            if device is not None:
                args, kwargs = _to(args, device), _to(kwargs, device)
        return self.counter.snapshot(*args, samples=self.samples, shape_only=self.shape_only, **kwargs)


def _to(value: Any, device: torch.device) -> Any:
    from torch.utils._pytree import tree_map

    return tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, value)
