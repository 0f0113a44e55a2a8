"""Your own language model in ``eval``: the calling convention, run as a stream under the online protocol.

The convention (any ``nn.Module``):

- stateless: ``forward(ids)`` with token ids ``[1, T]`` returns logits ``[1, T, V]``, the logits at position
  ``t`` predicting token ``t + 1`` from tokens ``0..t`` only (a causal model);
- stateful: ``forward(ids, state)`` returns ``(logits, state)``; ``state`` is None at the start of the stream and
  the state it returned afterwards (an LSTM's ``(h, c)``, a memory);
- Hugging Face causal LMs: ``forward(input_ids=ids, use_cache=True)`` with the key/value cache of the previous
  chunk (``cache``, or ``past_key_values`` before transformers 5), carried from chunk to chunk.

The split is one stream at batch 1 (rules §1.4: every token predicted before it is seen). It is fed in chunks;
each chunk's forward, with the log-softmax that turns logits into probabilities, is counted and charged to the
chunk's predictions. A stateful model's state and a Hugging Face model's cache carry over, so its context is the
whole stream (a cache restarts when it would pass the model's position limit). A stateless model has only the
chunk as context: its context restarts every ``context`` tokens (its ``context_size`` attribute, else its config's
position limit, else 4032), and the whole window's forward is charged to the window's predictions. A program
exported for ids of one length ``[1, T]`` (a ``.pt2`` without dynamic shapes) is fed windows of ``T`` tokens; a
shorter last window is padded after its tokens (a causal model's logits of the real tokens do not change), and
the padded forward, which is what runs, is charged to its predictions.

Causality is checked before evaluating: the logits of a prefix must not change when later tokens are added.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch
from torch import Tensor, nn

from micronet_score.errors import MicronetError

DEFAULT_CONTEXT = 4032


def is_huggingface(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def position_limit(model: nn.Module) -> int | None:
    """How many positions the model can attend to: its ``context_size``, else its config's limit."""
    config = getattr(model, "config", None)
    for value in (getattr(model, "context_size", None), getattr(config, "n_positions", None),
                  getattr(config, "max_position_embeddings", None)):
        if isinstance(value, int) and value > 0:
            return value
    return None


class TokenLM(nn.Module):
    """A model following the convention above, seen as a streaming LM (``new_stream``;
    ``(inputs, targets, state) -> (nll, state)`` with 1-d inputs and targets)."""

    def __init__(self, model: nn.Module, length: int | None = None):
        super().__init__()
        self.model = model
        self.huggingface = is_huggingface(model)
        self.length = length  # the one sequence length a fixed-shape program accepts
        self.limit = length or position_limit(model)
        self.chunk = min(self.limit or DEFAULT_CONTEXT, DEFAULT_CONTEXT)
        if self.huggingface and self.limit:  # chunks of half the limit: the cache carries over at least once
            self.chunk = max(1, min(self.limit // 2, DEFAULT_CONTEXT))
        self.cache_name = "past_key_values"  # transformers 4; 5 calls it cache
        if self.huggingface and "cache" in inspect.signature(model.forward).parameters:
            self.cache_name = "cache"

    def new_stream(self, device: Any = None) -> Any:
        return _Start()

    def logits(self, ids: Tensor, state: Any) -> tuple[Tensor, Any]:
        """(logits [1, T, V], the state to pass on) for ids [1, T]."""
        if self.huggingface:
            cache, seen = (None, 0) if isinstance(state, _Start) else state
            if cache is not None and self.limit is not None and seen + ids.shape[1] > self.limit:
                cache, seen = None, 0  # the position limit: a fresh context
            out = self.model(input_ids=ids, use_cache=True, **{self.cache_name: cache})
            return out.logits, (getattr(out, self.cache_name), seen + ids.shape[1])
        if self.length is not None:
            return self.model(nn.functional.pad(ids, (0, self.length - ids.shape[1])))[:, : ids.shape[1]], _Start()
        out = self.model(ids) if isinstance(state, _Start) else self.model(ids, state)
        if isinstance(out, tuple):
            if len(out) != 2:
                raise MicronetError(f"the model returned a tuple of {len(out)}: the convention is logits, or "
                                    "(logits, state) (see README: Your own language model)")
            return out
        if not isinstance(state, _Start):
            raise MicronetError("the model returned a state once and not again (see README: Your own language model)")
        return out, _Start()

    def forward(self, inputs: Tensor, targets: Tensor, state: Any) -> tuple[Tensor, Any]:
        logits, state = self.logits(inputs[None], state)
        if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[:2] != (1, inputs.numel()):
            shape = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise MicronetError(f"the model returned {shape} for ids [1, {inputs.numel()}]: the convention is logits "
                                "[1, T, V] (see README: Your own language model)")
        log_probs = torch.log_softmax(logits[0].float(), dim=-1)
        return torch._neg_view(log_probs.gather(1, targets[:, None])[:, 0]), state

    def check(self, tokens: Tensor, vocabulary: int) -> None:
        """The vocabulary the logits cover, and causality: the logits of the first half of ``tokens`` must be the
        same alone and with the second half after them (computed outside any counter)."""
        ids = tokens[None, : min(64, tokens.numel(), self.chunk)]
        with torch.no_grad():
            whole, _ = self.logits(ids, _Start())
            if whole.shape[-1] != vocabulary:
                raise MicronetError(f"the model predicts {whole.shape[-1]} words but the vocabulary has {vocabulary} "
                                    "(give the model's vocabulary file with --vocab)")
            half = max(1, ids.shape[1] // 2)
            prefix, _ = self.logits(ids[:, :half], _Start())
        if not torch.allclose(prefix.float(), whole[:, :half].float(), rtol=1e-3, atol=1e-4):
            raise MicronetError("the model's logits at a position change when later tokens are added: it sees "
                                "tokens before predicting them, which the online protocol forbids (a causal model "
                                "is needed)")


def exported_length(example_inputs: tuple | None) -> int | None:
    """The sequence length of a program exported for one input of token ids ``[1, T]``, else None."""
    if example_inputs is None or len(example_inputs) != 1 or not isinstance(example_inputs[0], Tensor):
        return None
    ids = example_inputs[0]
    integer = not ids.is_floating_point() and not ids.is_complex() and ids.dtype != torch.bool
    return int(ids.shape[1]) if integer and ids.dim() == 2 and ids.shape[0] == 1 else None


class _Start:
    """The state at the start of a stream: nothing seen."""
