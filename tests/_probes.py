"""A module that runs a function of its inputs (and of child modules, so that ops are charged to them)."""

from __future__ import annotations

from torch import nn


class Fn(nn.Module):
    def __init__(self, fn, *modules: nn.Module):
        super().__init__()
        self.fn = fn
        self.mods = nn.ModuleList(modules)

    def forward(self, *xs):
        return self.fn(self.mods, *xs)
