"""Block tilings (rules §1.3) against a naive reference written here: every block visited in Python loops, its
elements counted one by one. Odd shapes leave short edge blocks in the last block row and column."""

from __future__ import annotations

import pytest
import torch

from micronet_score.counting.blocks import CANDIDATES, Blocks, candidates, tile


def naive(values: torch.Tensor, shape: tuple[int, int]) -> tuple[int, int, int, bool]:
    """(blocks, kept, kept elements, exact) by visiting every block of the matrix (dim 0 by the rest)."""
    matrix = values.reshape(values.shape[0], -1).tolist()
    rows, cols = len(matrix), len(matrix[0])
    a, b = shape
    blocks = kept = elements = nonzeros = 0
    for top in range(0, rows, a):
        for left in range(0, cols, b):
            cells = [matrix[i][j] for i in range(top, min(top + a, rows)) for j in range(left, min(left + b, cols))]
            held = sum(1 for x in cells if x != 0)
            blocks += 1
            nonzeros += held
            if held:
                kept += 1
                elements += len(cells)
    return blocks, kept, elements, elements == nonzeros


def counts(tiling: Blocks) -> tuple[int, int, int, bool]:
    return tiling.blocks, tiling.kept, tiling.kept_elements, tiling.exact


def _sparse(shape: tuple[int, ...], density: float, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=g).to(dtype)
    values[values == 0] = 1
    return values * (torch.rand(shape, generator=g) < density)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64, torch.int8])
@pytest.mark.parametrize(
    ("shape", "density"),
    [((37, 53), 0.5), ((17, 31), 0.05), ((16, 16), 0.02), ((1, 45), 0.3), ((70, 3), 0.5), ((5, 3, 7), 0.2)],
)
def test_every_candidate_tiling_equals_the_naive_count(shape, density, dtype):
    values = _sparse(shape, density, dtype, seed=len(shape) * 100 + shape[0])
    if dtype.is_floating_point:
        values = torch.where((values == 0) & (torch.rand(values.shape) < 0.5), -0.0, values)  # -0.0 is a zero
    found = candidates(values)
    assert [t.shape for t in found] == list(CANDIDATES)
    for tiling in found:
        assert counts(tiling) == naive(values, tiling.shape)


def test_block_pruned_weights_tile_exactly_at_their_block_shape():
    """A 40x50 weight pruned by 8x8 blocks (the last block column 2 wide): 8x8 and 4x4 tile it exactly."""
    g = torch.Generator().manual_seed(3)
    keep = (torch.rand(5, 7, generator=g) < 0.5).repeat_interleave(8, 0).repeat_interleave(8, 1)[:40, :50]
    values = torch.randn(40, 50, generator=g) * keep
    by_shape = {t.shape: t for t in candidates(values)}
    for shape in CANDIDATES:
        assert counts(by_shape[shape]) == naive(values, shape)
    assert by_shape[(8, 8)].exact and by_shape[(4, 4)].exact and not by_shape[(16, 16)].exact


@pytest.mark.parametrize("shape", [(3, 5), (2, 8), (32, 32), (7, 1)])
def test_a_declared_block_shape_equals_the_naive_count(shape):
    values = _sparse((45, 67), 0.1, torch.float16, seed=shape[0])
    assert counts(tile(values, shape)) == naive(values, shape)


@pytest.mark.filterwarnings("ignore:.*quantized tensor creation")
def test_nan_is_a_nonzero_and_a_quantized_zero_point_is_a_zero():
    values = torch.zeros(20, 20)
    values[19, 19] = float("nan")
    assert [(t.kept, t.kept_elements) for t in candidates(values)][:2] == [(1, 4 * 4), (1, 4 * 4)]  # 16x16, 8x8
    quantized = torch.quantize_per_tensor(_sparse((18, 18), 0.1, torch.float32, 5), 0.1, 3, torch.quint8)
    assert [counts(t) for t in candidates(quantized)] == [naive(quantized.dequantize(), shape) for shape in CANDIDATES]
