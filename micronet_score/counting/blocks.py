"""Block sparsity (rules §1.3): one mask bit per block instead of one per element.

A tensor is viewed as a matrix (dim 0 by the rest, as a weight's rows); a block shape (a, b) tiles it, edge
blocks being smaller. A block that holds any nonzero is kept whole: its zeros are stored values too (and its dot
products multiply them). Any block shape is a legal representation; ``exact`` says whether every zero of the
tensor lies in an all-zero block (the shape a pruning by blocks would leave).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

CANDIDATES: tuple[tuple[int, int], ...] = (
    (16, 16),
    (8, 8),
    (16, 1),
    (1, 16),
    (4, 4),
    (8, 1),
    (1, 8),
    (2, 2),
    (4, 1),
    (1, 4),
)
"""Block shapes tried when none is declared, largest first."""


@dataclass(frozen=True, slots=True)
class Blocks:
    """A tensor tiled by blocks of one shape."""

    shape: tuple[int, int]
    blocks: int
    kept: int
    """blocks holding at least one nonzero"""
    kept_elements: int
    """values stored: every element of the kept blocks"""
    exact: bool
    """every zero of the tensor lies in an all-zero block"""


def nonzero_matrix(values: torch.Tensor) -> torch.Tensor:
    """The tensor's nonzero pattern as a float matrix (dim 0 by the rest), the input of :func:`tile`."""
    matrix = values.detach().reshape(values.shape[0] if values.dim() > 1 else 1, -1)
    if matrix.is_quantized:
        matrix = matrix.dequantize()
    return (matrix != 0).float()


def tile(values: torch.Tensor, shape: tuple[int, int], pattern: torch.Tensor | None = None) -> Blocks:
    """The blocks of this shape over a tensor viewed as (dim 0, rest); ``pattern``: its :func:`nonzero_matrix`,
    when already made."""
    a, b = shape
    nonzero = nonzero_matrix(values) if pattern is None else pattern
    rows, cols = nonzero.shape
    pad = (0, -cols % b, 0, -rows % a)

    def per_block(x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, pad)
        return x.reshape(x.shape[0] // a, a, x.shape[1] // b, b).sum(dim=(1, 3))

    counts = per_block(nonzero)
    kept = counts > 0
    sizes = per_block(torch.ones_like(nonzero)) if any(pad) else None
    kept_elements = int(sizes[kept].sum()) if sizes is not None else int(kept.sum()) * a * b
    return Blocks(shape, counts.numel(), int(kept.sum()), kept_elements, kept_elements == int(counts.sum()))


def candidates(values: torch.Tensor) -> list[Blocks]:
    """Every candidate block shape over the tensor, in :data:`CANDIDATES` order.

    One pass builds the nonzero pattern padded to multiples of 16; the counts per 2x2, 4x1 and 1x4 block are
    summed from it, and every larger candidate from a smaller one (4x4 from 2x2, 8x1 from 4x1, ...), so a large
    tensor is read three times, not once per shape. Padding holds no nonzeros; block sizes count real elements."""
    matrix = values.detach().reshape(values.shape[0] if values.dim() > 1 else 1, -1)
    if matrix.is_quantized:
        matrix = matrix.dequantize()
    rows, cols = matrix.shape
    pattern = torch.zeros(rows + (-rows % 16), cols + (-cols % 16), dtype=torch.uint8)
    pattern[:rows, :cols] = matrix != 0

    def pool(counts: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """Sums of a x b blocks, as a*b strided slices added (ten times faster than a strided reduction)."""
        total = counts[0::a, 0::b].to(torch.int16, copy=True)  # at most 256 nonzeros in a block
        for i in range(a):
            for j in range(b):
                if i or j:
                    total += counts[i::a, j::b]
        return total

    counts = {(2, 2): pool(pattern, 2, 2), (4, 1): pool(pattern, 4, 1), (1, 4): pool(pattern, 1, 4)}
    for (a, b), (sa, sb), (fa, fb) in (
        ((4, 4), (2, 2), (2, 2)), ((8, 8), (4, 4), (2, 2)), ((16, 16), (8, 8), (2, 2)),
        ((8, 1), (4, 1), (2, 1)), ((16, 1), (8, 1), (2, 1)),
        ((1, 8), (1, 4), (1, 2)), ((1, 16), (1, 8), (1, 2)),
    ):
        counts[(a, b)] = pool(counts[(sa, sb)], fa, fb)
    found = []
    for a, b in CANDIDATES:
        grid = counts[(a, b)][: -(-rows // a), : -(-cols // b)]
        kept = grid > 0
        heights = torch.full((grid.shape[0],), a, dtype=torch.int64)
        heights[-1] = rows - a * (grid.shape[0] - 1)
        widths = torch.full((grid.shape[1],), b, dtype=torch.int64)
        widths[-1] = cols - b * (grid.shape[1] - 1)
        kept_elements = int((kept * heights[:, None] * widths[None, :]).sum())
        found.append(Blocks((a, b), grid.numel(), int(kept.sum()), kept_elements, kept_elements == int(grid.sum())))
    return found


def detect(values: torch.Tensor) -> Blocks | None:
    """The largest candidate block shape whose all-zero blocks hold every zero (None: no zeros, or none fits)."""
    if values.dim() < 2:
        return None
    for blocks in candidates(values):
        if blocks.kept < blocks.blocks and blocks.exact:
            return blocks
    return None
