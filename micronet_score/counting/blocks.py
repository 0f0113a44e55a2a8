"""Block sparsity (rules §1.3): one mask bit per block instead of one per element.

A tensor is viewed as a matrix (dim 0 by the rest, as a weight's rows); a block shape (a, b) tiles it, edge
blocks being smaller. A block that holds any nonzero is kept whole: its zeros are stored values too. Blocks are
declared by the user, or detected: a candidate shape fits when every zero of the tensor lies in an all-zero block.
"""

from __future__ import annotations

from collections.abc import Iterable
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
"""Block shapes tried by detection, largest first."""


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


def tile(values: torch.Tensor, shape: tuple[int, int]) -> Blocks:
    """The blocks of this shape over a tensor viewed as (dim 0, rest)."""
    a, b = shape
    matrix = values.detach().reshape(values.shape[0] if values.dim() > 1 else 1, -1)
    if matrix.is_quantized:
        matrix = matrix.dequantize()
    rows, cols = matrix.shape
    pad = (0, -cols % b, 0, -rows % a)
    nonzero = F.pad((matrix != 0).float(), pad)
    present = F.pad(torch.ones_like(nonzero[:rows, :cols]), pad)

    def per_block(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0] // a, a, x.shape[1] // b, b).sum(dim=(1, 3))

    counts, sizes = per_block(nonzero), per_block(present)
    kept = counts > 0
    kept_elements = int(sizes[kept].sum())
    return Blocks(shape, counts.numel(), int(kept.sum()), kept_elements, kept_elements == int(counts.sum()))


def detect(values: torch.Tensor) -> Blocks | None:
    """The largest candidate block shape whose all-zero blocks hold every zero (None: no zeros, or none fits)."""
    if values.dim() < 2:
        return None
    return fitting(tile(values, shape) for shape in CANDIDATES)


def fitting(candidates: Iterable[Blocks]) -> Blocks | None:
    """The first candidate (largest first) with an all-zero block whose all-zero blocks hold every zero."""
    return next((blocks for blocks in candidates if blocks.kept < blocks.blocks and blocks.exact), None)
