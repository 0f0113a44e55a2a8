"""PyramidNet-272 (alpha 200, bottleneck, ShakeDrop at evaluation) on one 32x32 image, counted on the meta device.

Hand derivation (seed-systems spec B.1, B.5). Block i of stage s has inplanes c (16, then 4 x the previous planes),
planes p, input size S_in x S_in and output size S_out (32, 16, 8; the stride-2 3x3 conv opens stages 2 and 3, so
there conv1 still runs at the previous size):

* convs: conv1 c*p*S_in^2, conv2 9*p*p*S_out^2, conv3 p*4p*S_out^2 MACs; stem 27*16*32^2; fc 864*100.
  A dot product of length n: n mults, n - 1 adds per output.
* batch norm: bn2, bn3, bn4 and the stem's bn1 follow a conv: folded into its bias by the rule set, 1 add per
  element (16,920,064 in all, B.5); each block's pre-activation bn1 and bn_final are not foldable: 1 mult + 1 add
  per element (11,222,528, B.5).
* ReLU (1 mult, the rule set): after bn2 and bn3 of every block and before the final pool (5,752,832, B.5).
* ShakeDrop's expectation (1 - p) * x: 1 mult per element of every block's output, 4p*S_out^2 (11,206,144, B.5).
* residual add: our model zero-pads the shortcut and adds over the full width 4p*S_out^2, padded channels included
  (11,206,144; the authors' counter kept 1/100 of it, B.5; over the non-padded channels only it would be 10,797,824).
* avg pools: the stride-2 shortcuts (2x2: 3 adds + 1 mult per output) and the final 8x8 (63 adds + 1 mult).
"""

from __future__ import annotations

import pytest
import torch
from micronet_score.models import pyramidnet

SIZES = (32, 16, 8)


def blocks():
    """(name, inplanes, planes, input size, output size) of the 90 blocks."""
    c = 16
    for s, planes in enumerate(pyramidnet.stage_widths(272, 200)):
        for b, p in enumerate(planes):
            size_in = SIZES[s - 1] if s > 0 and b == 0 else SIZES[s]
            yield f"layer{s + 1}.{b}", c, p, size_in, SIZES[s]
            c = 4 * p


@pytest.fixture(scope="module")
def report(meta_count):
    return meta_count("pyramidnet-272", torch.empty(1, 3, 32, 32))


def test_every_convolution_against_its_formula(report):
    for name, c, p, size_in, size_out in blocks():
        assert report.layer(f"{name}.conv1").mults == c * p * size_in**2
        assert report.layer(f"{name}.conv2").mults == 9 * p * p * size_out**2
        assert report.layer(f"{name}.conv3").mults == 4 * p * p * size_out**2
        outputs = 4 * p * size_out**2
        assert report.layer(f"{name}.conv3").adds == (p - 1) * outputs
        assert report.layer(f"{name}.bn4").adds == outputs  # folded: the conv's bias
        assert report.layer(f"{name}.bn4").mults == 0
        assert report.layer(f"{name}.bn1").mults == report.layer(f"{name}.bn1").adds == c * size_in**2
        assert report.layer(f"{name}.shake_drop").mults == outputs
        assert report.layer(name).adds == outputs  # the residual add, full width
    assert report.layer("conv1").mults == 27 * 16 * 32**2
    assert report.layer("fc").mults == 864 * 100


def test_totals_by_family(report):
    conv = 27 * 16 * 1024 + 864 * 100
    conv_outputs = 16 * 1024 + 100
    outputs = norm_pre = relu = 0
    for _, c, p, size_in, size_out in blocks():
        conv += c * p * size_in**2 + 9 * p * p * size_out**2 + 4 * p * p * size_out**2
        conv_outputs += p * size_in**2 + p * size_out**2 + 4 * p * size_out**2
        outputs += 4 * p * size_out**2
        norm_pre += c * size_in**2
        relu += p * size_in**2 + p * size_out**2
    assert conv == 4_488_855_936  # B.1: 4.489 G unpruned conv + fc MACs
    dot = report.family("dot_product")
    assert (dot.mults, dot.adds) == (conv, conv - conv_outputs)
    assert outputs == 11_206_144 and norm_pre + 864 * 64 == 11_222_528
    assert relu + 864 * 64 == 5_752_832
    assert report.family("bias").adds == 16_920_064 + 100  # folded batch norms + the fc's bias
    bn = report.family("batch_norm")
    assert bn.mults == bn.adds == 11_222_528
    assert report.family("relu").mults == 5_752_832
    assert report.family("mul").mults == 11_206_144  # ShakeDrop
    assert report.family("add").adds == 11_206_144  # residuals
    pool = report.family("avg_pool")
    assert (pool.mults, pool.adds) == (332 * 16**2 + 596 * 8**2 + 864, 3 * (332 * 16**2 + 596 * 8**2) + 63 * 864)
    assert (pool.mults, pool.adds) == (124_000, 423_840)  # B.5
    assert not report.uncounted and report.others == 0


def test_storage_folds_batch_norms(report):
    # 26,288,692 parameters (B.1); a folded batch norm keeps 1 bias of its 2 values per channel: -(16 + 6 x 10,540)
    assert report.params == 26_288_692 - 63_256
