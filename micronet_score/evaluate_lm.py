"""Language-model evaluation under the official protocol, with optional operation counting in the same pass.

The protocol (WikiText-103 track, as the 2019 winners evaluated): batch 1; the whole split is one stream; every
token after the first is predicted once; the model's memory and cache carry across chunks and start empty for each
split. The result is the mean negative log-likelihood (natural log) over all predictions and ``ppl = e^NLL``; per
chunk sums are accumulated in float64. A model that carries its state exactly gives the same result for any chunk
size.

A streaming model provides ``new_stream(device) -> state`` and ``model(inputs, targets, state) -> (nll, state)``
with 1-d ``inputs``/``targets`` and per-token ``nll``.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from micronet_score.errors import MicronetError
from micronet_score.progress import rate_bar

DEFAULT_CHUNK = 4032
"""The authors' eval_chunk (42 segments of 96)."""


class StreamingLM(Protocol):
    def new_stream(self, device: torch.device | str | None = None) -> Any: ...

    def __call__(self, inputs: Tensor, targets: Tensor, state: Any) -> tuple[Tensor, Any]: ...


@dataclass
class LMEvaluation:
    """The quality of a language model on one token stream."""

    split: str
    predictions: int
    nll: float
    perplexity: float
    seconds: float
    chunk: int
    device: str

    @property
    def tokens_per_second(self) -> float:
        return self.predictions / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device, or a clear error when it is not available here."""
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise MicronetError(f"unknown device {device!r} ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MicronetError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise MicronetError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    usable = {"cpu", "cuda", "meta"} | ({"mps"} if torch.backends.mps.is_available() else set())
    if dev.type not in usable:
        raise MicronetError(f"device {device!r} is not available here (use cpu, cuda or cuda:N)")
    return dev


def default_chunk(model: Any) -> int:
    """The authors' 42 segments per chunk where the model has a segment length, else 4032 tokens."""
    n_seq = getattr(getattr(model, "config", None), "n_seq", None)
    return 42 * int(n_seq) if n_seq else DEFAULT_CHUNK


def whole_segments(model: Any, chunk: int) -> int:
    """``chunk`` rounded up to whole segments of the model's ``n_seq`` (as the authors' iterator required:
    eval_chunk % n_seq == 0). The kv memory is exact for any chunk, but the fp32 arithmetic of a segment that a
    chunk boundary splits differs in its last bits, and a 9-bit quantizer can turn that into a level: whole
    segments make the result the same for every chunk size."""
    n_seq = getattr(getattr(model, "config", None), "n_seq", None)
    return -(-chunk // int(n_seq)) * int(n_seq) if n_seq else chunk


def evaluate_stream(
    model: StreamingLM,
    tokens: Tensor,
    *,
    split: str = "stream",
    chunk: int | None = None,
    limit_tokens: int | None = None,
    device: str | torch.device = "cpu",
    counter: Any | None = None,
    progress: bool | None = None,
) -> LMEvaluation:
    """Mean NLL and perplexity of ``tokens`` (one split) as one stream, batch 1.

    ``limit_tokens`` stops after that many predictions (a quick look); ``counter`` (a micronet-score Counter)
    measures each chunk's forward with ``samples`` = its predictions; ``progress`` shows a bar (default: when
    stderr is a terminal).
    """
    tokens = torch.as_tensor(tokens).reshape(-1).long()
    n = tokens.numel() - 1
    if limit_tokens is not None:
        if limit_tokens < 1:
            raise MicronetError(f"limit_tokens must be at least 1, got {limit_tokens}")
        n = min(n, limit_tokens)
    if n < 1:
        raise MicronetError(f"{split}: needs at least 2 tokens to predict one, got {tokens.numel()}")
    chunk = chunk or default_chunk(model)
    if chunk < 1:
        raise MicronetError(f"chunk must be at least 1 token, got {chunk}")
    chunk = whole_segments(model, chunk)
    dev = resolve_device(device)
    model.to(dev)
    model.eval()
    stream = tokens[: n + 1].to(dev)
    total = 0.0
    start = time.perf_counter()
    with rate_bar(n, split, "tok", progress) as advance, torch.no_grad():
        state = model.new_stream(dev)
        for begin in range(0, n, chunk):
            end = min(begin + chunk, n)
            inputs, targets = stream[begin:end], stream[begin + 1 : end + 1]
            with counter.measure(samples=end - begin) if counter is not None else contextlib.nullcontext():
                nll, state = model(inputs, targets, state)
            total += float(nll.double().sum())
            advance(end - begin)
    seconds = time.perf_counter() - start
    mean = total / n
    return LMEvaluation(split, n, mean, _exp(mean), seconds, chunk, str(dev))


def evaluate_splits(
    model: StreamingLM,
    data_dir: str | os.PathLike,
    splits: Sequence[str] = ("valid", "test"),
    *,
    vocab: Any = None,
    order: str = "frequency",
    vocab_file: str | os.PathLike | None = None,
    **kwargs: Any,
) -> list[LMEvaluation]:
    """Evaluate each split of a WikiText-style directory in turn (fresh memory and cache per split)."""
    from micronet_score.data.wikitext import load_split, load_vocabulary

    vocab = vocab or load_vocabulary(data_dir, order=order, vocab_file=vocab_file)
    n_vocab = getattr(getattr(model, "config", None), "n_vocab", None)
    if n_vocab is not None and len(vocab) != n_vocab:
        raise MicronetError(f"the vocabulary has {len(vocab)} words but the model predicts {n_vocab}")
    return [evaluate_stream(model, load_split(data_dir, s, vocab), split=s, **kwargs) for s in splits]


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


