"""Bit-widths measured from values: the uniform grid a tensor's values lie on and the narrowest width holding it.

A b-bit uniform grid is ``{s * q}`` (symmetric: zero on the grid, q a signed b-bit integer) or ``{z + s * q}``
(affine: ``2**b`` levels from the minimum). The grid step is the floating-point greatest common divisor of the
differences between distinct values (zero included for the symmetric grid), found with a tolerance that accepts
values rounded to fp32. Values on no grid of at most 2**18 levels need their storage width (32 for fp32).
Rules §1.5 also need the scale of a grid to keep ``q * s`` exact in fp32: see :func:`exact_scale_bits`.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

MAX_LEVELS = 2**18
"""Grids of more levels are not searched: values needing more than 18 bits count at their storage width."""

DTYPE_BITS: dict[torch.dtype, int] = {
    torch.qint8: 8,
    torch.quint8: 8,
    torch.qint32: 32,
    torch.quint4x2: 4,
    torch.quint2x4: 2,
    torch.int8: 8,
    torch.uint8: 8,
    torch.int16: 16,
    torch.float16: 16,
    torch.bfloat16: 16,
    torch.bool: 1,
}
"""Widths of the narrow dtypes (the storage width a value of that dtype has without any declaration)."""


QUANTIZED: dict[torch.dtype, int] = {
    dtype: bits for dtype, bits in DTYPE_BITS.items() if not dtype.is_floating_point and dtype != torch.bool
}
"""Integer and quantized dtypes: a value of one has its dtype's width, whatever the declared activation width."""


def dtype_bits(dtype: torch.dtype) -> int:
    """Storage width of a dtype (element size in bits when it is not a narrow dtype)."""
    width = DTYPE_BITS.get(dtype)
    if width is not None:
        return width
    return torch.empty((), dtype=dtype).element_size() * 8


@dataclass(frozen=True, slots=True)
class Grid:
    """The uniform grids that hold a set of values."""

    distinct: int
    step: float | None = None
    """affine grid step (None: the values lie on no uniform grid of at most MAX_LEVELS levels)"""
    levels: int | None = None
    """affine levels from the minimum to the maximum value"""
    symmetric_step: float | None = None
    q_min: int | None = None
    q_max: int | None = None
    """integer range of the symmetric grid (values = symmetric_step * q)"""

    @property
    def affine_bits(self) -> int | None:
        return None if self.levels is None else max(1, math.ceil(math.log2(self.levels)))

    @property
    def symmetric_bits(self) -> int | None:
        if self.q_min is None or self.q_max is None:
            return None
        return signed_bits(self.q_min, self.q_max)

    @property
    def bits(self) -> int | None:
        """The narrowest uniform grid (symmetric or affine) that holds the values; None when there is none."""
        widths = [b for b in (self.affine_bits, self.symmetric_bits) if b is not None]
        return min(widths) if widths else None


def signed_bits(q_min: int, q_max: int) -> int:
    """Narrowest two's-complement width holding integers q_min..q_max."""
    bits = 1
    while q_min < -(2 ** (bits - 1)) or q_max > 2 ** (bits - 1) - 1:
        bits += 1
    return bits


def _tolerance(ratios: torch.Tensor) -> torch.Tensor:
    """How far from an integer a ratio of fp32-rounded grid values may lie (fp32 relative error 2**-24)."""
    return 1e-3 + ratios.abs() * 2.0**-20


def _float_gcd(a: float, b: float, eps: float) -> float:
    """Greatest common divisor of two positive floats, remainders below eps counting as zero."""
    a, b = max(a, b), min(a, b)
    while b > eps:
        a, b = b, abs(a - b * round(a / b))
    return a


def _step(sorted_unique: torch.Tensor) -> float | None:
    """Step of the coarsest uniform grid holding these sorted distinct float64 values (None: no grid).

    The step divides the smallest difference: smallest / k for the k that a floating-point Euclid suggests (its
    result only picks k, as its rounding errors grow), refitted by least squares to every difference.
    """
    if not 2 <= sorted_unique.numel() <= MAX_LEVELS:
        return None
    diffs = sorted_unique[1:] - sorted_unique[:-1]
    span = float(sorted_unique[-1] - sorted_unique[0])
    eps = float(sorted_unique.abs().max()) * 2.0**-19  # well above fp32 rounding, below any searched step
    smallest = float(diffs.min())
    guess = smallest
    for _ in range(64):
        if guess <= eps:
            return None
        step = smallest / max(1, round(smallest / guess))
        if span / step >= MAX_LEVELS:
            return None
        ratios = diffs / step
        multiples = ratios.round()
        fitted = float((multiples * diffs).sum() / (multiples * multiples).sum())
        refit = diffs / fitted
        if bool(((refit - refit.round()).abs() <= _tolerance(refit)).all()):
            return fitted
        worst = int((ratios - multiples).abs().argmax())  # the difference furthest from a multiple of step
        guess = _float_gcd(step, float(diffs[worst]), eps)
    return None


def measure(values: torch.Tensor) -> Grid:
    """The grids of a tensor's values, taken as one set (per tensor)."""
    flat = values.detach().reshape(-1)
    if flat.is_quantized:
        flat = flat.dequantize()
    unique = torch.unique(flat.to(torch.float64))
    distinct = unique.numel()
    if distinct < 2:
        return Grid(distinct, 0.0, 1, 0.0, 0, 0) if distinct else Grid(0)
    step = _step(unique)
    levels = None if step is None else round(float(unique[-1] - unique[0]) / step) + 1
    with_zero = unique if bool((unique == 0).any()) else torch.unique(torch.cat([unique, unique.new_zeros(1)]))
    sym = _step(with_zero)
    q_min = q_max = None
    if sym is not None:
        q_min, q_max = round(float(unique[0]) / sym), round(float(unique[-1]) / sym)
    return Grid(distinct, step, levels, sym, q_min, q_max)


def measure_rows(values: torch.Tensor) -> tuple[int | None, int]:
    """Narrowest width holding every row of a weight (dim 0) on its own grid, and the number of rows.

    Rows are checked together against the grids of their smallest gaps (which can only overstate a grid's
    step, so understate its width); rows that fail are measured one by one, stopping at the first row on no
    grid (the per-row width is then unknown: None).
    """
    rows = values.detach()
    if rows.is_quantized:
        rows = rows.dequantize()
    rows = rows.reshape(rows.shape[0] if rows.dim() > 1 else 1, -1).to(torch.float64)
    ordered = rows.sort(dim=1).values
    low, high = ordered[:, :1], ordered[:, -1:]
    step = _smallest_gap(ordered)
    sym = torch.minimum(step, torch.where(rows != 0, rows.abs(), torch.full_like(rows, math.inf)).amin(1, True))
    ok = _on_grid(_ratios(rows - low, step)) & _on_grid(_ratios(rows, sym))
    ok &= ~(torch.isfinite(step) & ((high - low) / step >= MAX_LEVELS)).squeeze(1)
    levels = torch.where(torch.isfinite(step), ((high - low) / step).round() + 1, torch.ones_like(step))
    affine = torch.ceil(torch.log2(levels)).clamp(min=1)
    q_min, q_max = _ratios(low, sym).round(), _ratios(high, sym).round()
    # signed width: the smallest b with -2**(b-1) <= q_min and q_max <= 2**(b-1) - 1
    symmetric = torch.ceil(torch.maximum(torch.log2(q_max.clamp(min=0) + 1), torch.log2((-q_min).clamp(min=1)))) + 1
    width = int(torch.minimum(affine, symmetric).max())
    for i in torch.nonzero(~ok).flatten().tolist():
        bits = measure(rows[i]).bits
        if bits is None:
            return None, rows.shape[0]
        width = max(width, bits)
    return width, rows.shape[0]


def _smallest_gap(ordered: torch.Tensor) -> torch.Tensor:
    """Smallest positive gap between a row's sorted values (inf for a constant row), as a column."""
    gaps = ordered[:, 1:] - ordered[:, :-1]
    gaps = torch.where(gaps > 0, gaps, torch.full_like(gaps, math.inf))
    if not gaps.shape[1]:
        return torch.full((ordered.shape[0], 1), math.inf, dtype=ordered.dtype)
    return gaps.amin(dim=1, keepdim=True)


def _ratios(values: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(step), values / step, torch.zeros_like(values))


def _on_grid(ratios: torch.Tensor) -> torch.Tensor:
    return ((ratios - ratios.round()).abs() <= _tolerance(ratios)).all(dim=1)


def mantissa_bits(value: float) -> int:
    """Significant bits of a value's fp32 significand (1..24; 0 for zero or a non-finite value)."""
    if value == 0 or not math.isfinite(value):
        return 0
    word = struct.unpack("<I", struct.pack("<f", value))[0]
    exponent, fraction = (word >> 23) & 0xFF, word & 0x7FFFFF
    significand = fraction | (0x800000 if exponent else 0)
    if significand == 0:
        return 0
    trailing = (significand & -significand).bit_length() - 1
    return (24 if exponent else significand.bit_length()) - trailing


def exact_scale_bits(bits: int) -> int:
    """Most significant bits a grid scale may have so that q * s is exact in fp32 for every |q| < 2**(bits-1)."""
    return 24 - (bits - 1)
