"""Small models of one's own, importable as ``own_models:Factory`` (tests/ is on the import path)."""

import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """Conv + batch norm + ReLU, a residual add, global pooling and a classifier."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = y + self.bn2(self.conv2(y))
        return self.fc(y.mean((2, 3)))


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention by scaled_dot_product_attention, then an MLP."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class LSTMLM(nn.Module):
    """A language model by the convention: ids [1, T] (and a state) -> (logits [1, T, V], state)."""

    def __init__(self, vocab: int = 50, dim: int = 16):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.out = nn.Linear(dim, vocab)

    def forward(self, ids, state=None):
        h, state = self.lstm(self.embedding(ids), state)
        return self.out(h), state


class CausalLM(nn.Module):
    """A stateless language model (ids [1, T] -> logits [1, T, V]) that sees ``context_size`` tokens at most."""

    def __init__(self, vocab: int = 50, dim: int = 16, context: int = 8):
        super().__init__()
        self.context_size = context
        self.embedding = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(context, dim)
        self.block = Block(dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, ids):
        x = self.embedding(ids) + self.position.weight[: ids.shape[1]]
        return self.out(self.block(x))


class Bidirectional(CausalLM):
    """Not causal: every position sees the mean of the whole window (the online protocol forbids it)."""

    def forward(self, ids):
        x = self.embedding(ids)
        return self.out(x + x.mean(1, keepdim=True))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(5, 3)

    def forward(self, x, y):
        return self.a(x) + self.b(y)
