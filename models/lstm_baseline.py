"""The WikiText-103 baseline LSTM (Rae et al. 2018, arXiv:1803.10049).

Tied 512-wide embedding and softmax over the 267,735-word vocabulary; one LSTM layer of 2048 units; a linear
projection 2048 -> 512 (no bias) back to the embedding width; logits = projection @ embedding^T + bias.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from micronet_score.models.registry import ModelSpec, register
from torch import nn


class LSTMBaseline(nn.Module):
    def __init__(self, vocabulary: int = 267_735, embedding: int = 512, hidden: int = 2048):
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, embedding)
        self.lstm = nn.LSTM(embedding, hidden, num_layers=1, batch_first=True)
        self.projection = nn.Linear(hidden, embedding, bias=False)
        self.softmax_bias = nn.Parameter(torch.zeros(vocabulary))

    def forward(self, tokens: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Next-token logits for tokens (batch, time); the softmax matrix is the tied embedding."""
        h, _ = self.lstm(self.embedding(tokens), state)
        return F.linear(self.projection(h), self.embedding.weight, self.softmax_bias)


def build(config: Mapping[str, Any]) -> LSTMBaseline:
    return LSTMBaseline(
        int(config.get("vocabulary", 267_735)), int(config.get("embedding", 512)), int(config.get("hidden", 2048))
    )


register(
    ModelSpec(
        name="lstm-baseline",
        title="WikiText-103 LSTM baseline (2048 units, tied 512 embedding)",
        track="wikitext103",
        build=build,
        default_config={"vocabulary": 267_735, "embedding": 512, "hidden": 2048},
        example_inputs=lambda model: (torch.zeros(1, 1, dtype=torch.long),),
    )
)
