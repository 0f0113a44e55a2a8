"""Block sparsity (rules §1.3): one mask bit per block instead of one per element.

A tensor is viewed as a matrix (dim 0 by the rest, as a weight's rows); a block shape (a, b) tiles it, edge
blocks being smaller. A block that holds any nonzero is kept whole: its zeros are stored values too (and its dot
products multiply them). Any block shape is a legal representation; ``exact`` says whether every zero of the
tensor lies in an all-zero block (the shape a pruning by blocks would leave).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from micronet_score.counting.bitviews import integer_bits

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


def nonzero_pattern(values: torch.Tensor, multiple: tuple[int, int] = (1, 1)) -> tuple[np.ndarray, int, int]:
    """(pattern, rows, cols): the tensor viewed as a matrix (dim 0 by the rest), one byte per element, 1 where it is
    nonzero (-0.0 is zero, NaN nonzero), zero-padded to multiples of ``multiple`` rows and columns."""
    matrix = values.detach().reshape(values.shape[0] if values.dim() > 1 else 1, -1)
    if matrix.is_quantized:
        matrix = matrix.dequantize()
    rows, cols = matrix.shape
    a, b = multiple
    pattern = np.zeros((rows + -rows % a, cols + -cols % b), dtype=np.bool_)
    bits = integer_bits(matrix.contiguous())
    if bits is None:
        pattern[:rows, :cols] = (matrix != 0).cpu().numpy()
    else:
        view, shift = bits
        step = max(1, PASS_ELEMENTS // max(1, cols))
        for start in range(0, rows, step):  # a band of rows at a time: the shifted copy stays in cache
            band = view[start : start + step]
            np.not_equal(band << 1 if shift else band, 0, out=pattern[start : start + len(band), :cols])
    return pattern.view(np.uint8), rows, cols


PASS_ELEMENTS = 1 << 16
"""Elements compared per pass of :func:`nonzero_pattern`."""


def _summary(shape: tuple[int, int], occupied: np.ndarray, rows: int, cols: int, nonzeros: int) -> Blocks:
    """The tiling of a rows x cols matrix by blocks of ``shape`` from one entry per block (nonzero: the block holds
    a nonzero; the grid may go on past the matrix with zeros). The last block row and column may be short."""
    a, b = shape
    across, down = -(-rows // a), -(-cols // b)
    kept = int(np.count_nonzero(occupied))
    short_rows, short_cols = a * across - rows, b * down - cols
    kept_elements = kept * a * b
    if kept and short_rows:
        kept_elements -= short_rows * b * int(np.count_nonzero(occupied[across - 1, :down]))
    if kept and short_cols:
        kept_elements -= a * short_cols * int(np.count_nonzero(occupied[:across, down - 1]))
    if kept and short_rows and short_cols and occupied[across - 1, down - 1]:
        kept_elements += short_rows * short_cols
    return Blocks(shape, across * down, kept, kept_elements, kept_elements == nonzeros)


def tile(values: torch.Tensor, shape: tuple[int, int]) -> Blocks:
    """The blocks of this shape over a tensor viewed as (dim 0, rest)."""
    a, b = shape
    pattern, rows, cols = nonzero_pattern(values, shape)
    occupied = pattern.reshape(pattern.shape[0] // a, a, pattern.shape[1] // b, b).any(axis=(1, 3))
    return _summary(shape, occupied, rows, cols, int(np.count_nonzero(pattern)))


_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def candidates(values: torch.Tensor) -> list[Blocks]:
    """Every candidate block shape over the tensor, in :data:`CANDIDATES` order.

    A block holds a nonzero when any byte of the tensor's nonzero pattern (padded to multiples of 16) under it is
    1, and "any" composes: the pattern of a x 1 blocks is the bytewise OR of pairs of rows of the (a/2) x 1 one, 8
    bytes per operation, and b neighbouring bytes of a row, read as one b-byte word, are nonzero exactly when one of
    them is. So the tensor is compared with zero once and every tiling follows from a few passes over bytes."""
    pattern, rows, cols = nonzero_pattern(values, (16, 16))
    nonzeros = int(np.count_nonzero(pattern))
    tall = {1: pattern}  # height -> one byte per (height x 1) block, 1 where it holds a nonzero
    for height in (2, 4, 8, 16):
        words = tall[height // 2].view(np.uint64)
        tall[height] = (words[0::2] | words[1::2]).view(np.uint8)

    def occupied(a: int, b: int) -> np.ndarray:
        if b == 16:
            words = tall[a].view(np.uint64)
            return words[:, 0::2] | words[:, 1::2]
        return tall[a].view(_WORDS[b])

    return [_summary((a, b), occupied(a, b), rows, cols, nonzeros) for a, b in CANDIDATES]


def detect(values: torch.Tensor) -> Blocks | None:
    """The largest candidate block shape whose all-zero blocks hold every zero (None: no zeros, or none fits)."""
    if values.dim() < 2:
        return None
    for blocks in candidates(values):
        if blocks.kept < blocks.blocks and blocks.exact:
            return blocks
    return None
