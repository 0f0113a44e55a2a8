"""Wave Computing's pruned PyramidNet: dot-product work follows each weight's density, masks by the rule set.

A generated checkpoint of the shallow PyramidNet-29 (made-up ranks, see wave_checkpoints) with explicit zeros
in most factorised weights; a few stay dense. Hand derivation (seed-systems spec B.5, the rules' storage):

* a conv whose weight W has nnz nonzeros over cout output channels, at output size S: dot products of length
  nnz/cout, so nnz*S^2 mults and (nnz/cout - 1)*cout*S^2 adds (Wave's own formula: mults = nnz(W)*H_out*W_out);
* rotation A runs at the layer's input size; the core (which carries the stride) and rotation G at its output size;
  the fc's factors run once per image, rotation A on 864 features plus the constant 1;
* storage at 9 bits per weight: nnz*9/32 for every weight, plus a 1-bit mask over all elements (numel/32) only for
  weights that hold a zero (micronet-2019: mask.only_sparse_tensors);
* multiplies at the widest operand (12-bit activations, 9-bit weights: 12 bits), adds at the 32-bit accumulator.
"""

from __future__ import annotations

import pytest
import torch
from micronet_score.models import pyramidnet, wave_pyramidnet
from wave_checkpoints import SHALLOW, sparse_checkpoint

import micronet_score as ms

DENSE = {"conv1", "layer2.1.conv2", "fc"}  # layers left without zeros
SIZES = (32, 16, 8)


def layer_sizes():
    """(layer, input size, output size) of every factorised layer of the shallow network (the fc: 1)."""
    yield "conv1", 32, 32
    for s, planes in enumerate(pyramidnet.stage_widths(**SHALLOW)):
        for b in range(len(planes)):
            size_in = SIZES[s - 1] if s > 0 and b == 0 else SIZES[s]
            prefix = f"layer{s + 1}.{b}"
            yield f"{prefix}.conv1", size_in, size_in
            yield f"{prefix}.conv2", size_in, SIZES[s]
            yield f"{prefix}.conv3", SIZES[s], SIZES[s]
    yield "fc", 1, 1


def factors(layer: str) -> list[tuple[str, str]]:
    """(module path, state-dict key) of rotation A, the core and rotation G."""
    if layer == "fc":
        return [(f"fc.basis.sequential.{i}{leaf}", f"fc.basis.sequential.{i}{leaf}.weight")
                for i, leaf in ((0, ".linear"), (1, ""), (2, ".linear"))]
    return [(f"{layer}.basis.sequential.{i}{leaf}", f"{layer}.basis.sequential.{i}{leaf}.weight")
            for i, leaf in ((0, ".conv"), (1, ""), (2, ".conv"))]


@pytest.fixture(scope="module")
def pruned():
    state = sparse_checkpoint(2, **SHALLOW)
    gen = torch.Generator().manual_seed(3)
    for layer, _, _ in layer_sizes():
        if layer in DENSE:
            continue
        for _, key in factors(layer):
            weight = state[key]
            keep = torch.rand(weight.shape, generator=gen) < 0.6
            keep.view(-1)[0] = True  # never all zero
            keep.view(-1)[-1] = False  # always some zero
            state[key] = weight * keep
    return state


@pytest.fixture(scope="module")
def report(pruned):
    model = wave_pyramidnet.load_wave_pyramidnet(pruned)
    with torch.no_grad():
        # Wave's report stores every pruned weight as its nonzeros plus a 1-bit mask: forced here, so that the
        # storage follows their formula (auto may tile a few small tensors cheaper)
        return ms.count(
            model, torch.randn(1, 3, 32, 32), track="cifar100", bits=9, act_bits=12, representation="masked"
        )


def test_dot_products_scale_with_each_weights_density(pruned, report):
    total = 0
    for layer, size_in, size_out in layer_sizes():
        for i, (path, key) in enumerate(factors(layer)):
            weight = pruned[key]
            nnz, cout = int(torch.count_nonzero(weight)), weight.shape[0]
            positions = (size_in if i == 0 else size_out) ** 2
            row = report.layer(path)
            assert row.mults == pytest.approx(nnz * positions, rel=1e-12)
            # n - 1 adds per output; a layer with fewer nonzeros than outputs sums nothing (never a negative count)
            assert row.adds == pytest.approx(max(nnz - cout, 0) * positions, rel=1e-12)
            assert row.flops == pytest.approx(row.mults * 12 / 32 + row.adds, rel=1e-12)
            total += nnz * positions
    assert report.family("dot_product").mults == pytest.approx(total, rel=1e-12)


def test_storage_values_at_9_bits_and_masks_only_on_sparse_weights(pruned, report):
    for layer, _, _ in layer_sizes():
        for path, key in factors(layer):
            weight = pruned[key]
            nnz, numel = int(torch.count_nonzero(weight)), weight.numel()
            row = report.layer(path)
            assert row.nonzeros == nnz and row.params == numel
            mask = 0 if layer in DENSE else numel / 32
            assert (nnz < numel) == (layer not in DENSE)
            assert row.storage == pytest.approx(nnz * 9 / 32 + mask, rel=1e-12)
