"""Sliding-window contractions with exactly ``W`` terms per query, run as matrix products.

Query ``i`` (of ``L``) contracts with the ``W`` rows ``rows[i : i + W]`` of a ``(..., L + W - 1, d)`` tensor:
window column ``t`` is row ``i + t``. This is the attention band (``W = n_seq + 1`` keys, memory prepended) and
the neural cache (``W = n_cache`` past states, the query itself excluded).

A block of ``b`` consecutive queries shares ``W - b + 1`` rows of its windows (one matrix product for the block)
and needs ``b - 1`` more rows each (a ragged triangle, gathered). So every query does exactly ``W`` dot products,
with no wasted work for an operation counter to price, and the rows are re-used across the block.
Inside a block the window columns come in a fixed *arrangement* (ragged part first, then the shared part):
:meth:`SlidingWindow.offsets` maps it back to the window column ``t``. Softmaxes and sums do not care about the
order; position terms are gathered into the arrangement.

:class:`PaddedBand` is the same plan computed faster where every product need not be exactly a window term: each
block's queries take one matrix product with all ``b + W - 1`` rows any of them needs, and the window of query
``r`` is the band ``[r, r + W)`` of its row of that product, a strided view in the natural column order ``t``. It
computes ``b - 1`` products per query that are not window terms (and a zero weight for each in the weighted sum),
in a few large products instead of many ragged ones. The model runs it and prices :class:`SlidingWindow` (a pricing
hint), whose products are exactly the window's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor


@dataclass(frozen=True)
class Group:
    """``n_blocks`` blocks of ``block`` queries each, starting at query ``start``."""

    start: int
    n_blocks: int
    block: int

    @property
    def n_queries(self) -> int:
        return self.n_blocks * self.block


class SlidingWindow:
    """The blocking plan for ``n_queries`` queries over windows of ``width`` rows."""

    def __init__(
        self,
        n_queries: int,
        width: int,
        block: int = 32,
        max_queries: int = 1024,
    ):
        self.n_queries = n_queries
        self.width = width
        block = max(1, min(block, width, max(n_queries, 1)))
        per_group = max(1, max_queries // block)
        full = n_queries // block
        groups = [Group(i * block, min(per_group, full - i), block) for i in range(0, full, per_group)]
        if n_queries - full * block:
            groups.append(Group(full * block, 1, n_queries - full * block))
        self.groups = groups

    def queries(self, q: Tensor, g: Group) -> Tensor:
        """The group's queries ``(..., L, d)`` as ``(..., n_blocks, block, d)``."""
        return q.narrow(-2, g.start, g.n_queries).unflatten(-2, (g.n_blocks, g.block))

    def _shared(self, rows: Tensor, g: Group) -> Tensor:
        """Rows shared by each block: ``(..., n_blocks, d, W - b + 1)`` (a view)."""
        b, size = g.block, self.width - g.block + 1
        return rows.narrow(-2, g.start + b - 1, (g.n_blocks - 1) * b + size).unfold(-2, size, b)

    def _ragged(self, rows: Tensor, g: Group) -> Tensor:
        """The ``b - 1`` rows each query needs besides the shared ones: ``(..., n_blocks, b, d, b - 1)``."""
        b, n = g.block, (g.n_blocks - 1) * g.block + g.block - 1
        before = rows.narrow(-2, g.start, n).unfold(-2, b - 1, b)
        after = rows.narrow(-2, g.start + self.width, n).unfold(-2, b - 1, b)
        return torch.cat([before, after], dim=-1).unfold(-1, b - 1, 1).movedim(-2, -3)

    def scores(self, q: Tensor, rows: Tensor, g: Group) -> Tensor:
        """Dot products of the group's queries with their windows, arranged: ``(..., n_blocks, block, W)``."""
        qg = self.queries(q, g)
        shared = _matmul(qg, self._shared(rows, g))
        if g.block == 1:
            return shared
        ragged = _matmul(qg.unsqueeze(-2), self._ragged(rows, g)).squeeze(-2)
        return torch.cat([ragged, shared], dim=-1)

    def weighted_sum(self, p: Tensor, rows: Tensor, g: Group) -> Tensor:
        """Σ_t p[i, t] · rows[i + t] for arranged weights ``p``; returns ``(..., n_blocks * block, d)``."""
        b = g.block
        out = _matmul(p[..., b - 1 :], self._shared(rows, g).transpose(-1, -2))
        if b > 1:
            ragged = _matmul(p[..., : b - 1].unsqueeze(-2), self._ragged(rows, g).transpose(-1, -2)).squeeze(-2)
            out = ragged + out
        return out.flatten(-3, -2)

    def arrange(self, values: Tensor, g: Group) -> Tensor:
        """A per-row quantity ``(..., L + W - 1)`` in the window arrangement: ``(..., n_blocks, block, W)``."""
        rows = values.unsqueeze(-1)
        shared = self._shared(rows, g).squeeze(-2).unsqueeze(-2)
        shared = shared.expand(*shared.shape[:-2], g.block, shared.shape[-1])
        if g.block == 1:
            return shared
        ragged = self._ragged(rows, g).squeeze(-2)
        return torch.cat([ragged, shared], dim=-1)

    def position(self, table: Tensor, g: Group) -> Tensor:
        """A per-query, per-window-column quantity ``(..., L, W)`` (column ``t``) in the arrangement."""
        rows = self.queries(table, g)
        return rows.gather(-1, self.offsets(g, table.device).expand(rows.shape))

    def offsets(self, g: Group, device: torch.device | str | None = None) -> Tensor:
        """The window column ``t`` of each arranged column, for query ``r`` of a block: ``(block, W)``.

        Built from Python integers (no tensor arithmetic, so nothing for an operation counter to price) and
        cached per shape and device.
        """
        return _offsets(g.block, self.width, str(torch.device(device) if device is not None else "cpu"))


class PaddedBand(SlidingWindow):
    """The plan of :class:`SlidingWindow` computed by padded block products (see the module docstring); window
    columns in the natural order ``t``. Results are views where they can be: banded scores, arranged rows."""

    def _span(self, g: Group) -> int:
        return g.block + self.width - 1

    def _windows(self, rows: Tensor, g: Group) -> Tensor:
        """The rows each block needs: ``(..., n_blocks, d, b + W - 1)`` (a view)."""
        span = self._span(g)
        return rows.narrow(-2, g.start, (g.n_blocks - 1) * g.block + span).unfold(-2, span, g.block)

    def _band(self, full: Tensor) -> Tensor:
        """Columns ``[r, r + W)`` of row ``r`` of ``(..., block, b + W - 1)`` (unit column stride): a view."""
        *outer, row, column = full.stride()
        return full.as_strided((*full.shape[:-1], self.width), (*outer, row + column, column), full.storage_offset())

    def scores(self, q: Tensor, rows: Tensor, g: Group) -> Tensor:
        return self._band(_matmul(self.queries(q, g), self._windows(rows, g)))

    def weighted_sum(self, p: Tensor, rows: Tensor, g: Group) -> Tensor:
        full = p.new_zeros(*p.shape[:-1], self._span(g))
        self._band(full).copy_(p)
        return _matmul(full, self._windows(rows, g).transpose(-1, -2)).flatten(-3, -2)

    def arrange(self, values: Tensor, g: Group) -> Tensor:
        *outer, step = values.stride()
        shape = (*values.shape[:-1], g.n_blocks, g.block, self.width)
        return values.as_strided(shape, (*outer, g.block * step, step, step), values.storage_offset() + g.start * step)

    def position(self, table: Tensor, g: Group) -> Tensor:
        return self.queries(table, g)


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b``; for 4-d operands of equal batch shape (heads, blocks), one batched product per head:
    ``torch.matmul`` flattens the batch dims into one, which copies an unfolded window operand (its batch
    strides do not chain), while each slice goes to the batched product as it is."""
    if a.dim() != 4 or a.shape[:-2] != b.shape[:-2]:
        return a @ b
    return torch.stack([torch.bmm(x, y) for x, y in zip(a.unbind(0), b.unbind(0), strict=True)])


@lru_cache(maxsize=64)
def _offsets(b: int, w: int, device: str) -> Tensor:
    table = []
    for r in range(b):
        ragged = [j if j < b - 1 - r else j + w - b + 1 for j in range(b - 1)]
        table.append(ragged + [b - 1 - r + t for t in range(w - b + 1)])
    return torch.tensor(table, dtype=torch.long, device=device)
