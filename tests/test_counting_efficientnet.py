"""EfficientNet-B0 at 224x224, counted on the meta device, against the network written out by hand.

The stage table is Tan & Le's (2019) table 1 with the reference code's strides: per stage the expansion t, the
kernel k, the output channels, the repeats and the input and output sizes. Per MBConv block (cin -> mid = t*cin ->
cout, squeezed width q = max(1, int(cin / 4)), input size A, output size S; A = S after a stage's first block):

* expansion 1x1 (t > 1): cin*mid*A^2 MACs; its batch norm folds into a bias (1 add per element); swish.
* depthwise k x k: k^2*mid*S^2 MACs; folded batch norm; swish.
* squeeze-and-excitation: the mean over S^2 (S^2 - 1 adds and 1 division per channel), 1x1 mid -> q with bias,
  swish on q values, 1x1 q -> mid with bias, sigmoid on mid values, the channel scale (mid*S^2 mults).
* projection 1x1: mid*cout*S^2 MACs, folded batch norm, no activation; + the input when stride 1 and cin = cout.

Stem 3x3/2 3 -> 32 with folded BN and swish; head 1x1 320 -> 1280 with folded BN and swish, mean over 7x7, fc.
Prices from the rule set (micronet-2019): swish 3 mults + 1 add, sigmoid 2 mults + 1 add, mean per channel n - 1 adds
+ 1 mult, a dot product of n terms n mults and n - 1 adds, bias and residual 1 add.
"""

from __future__ import annotations

import pytest
import torch

STAGES = [  # (t, k, cout, repeats, input size, output size)
    (1, 3, 16, 1, 112, 112),
    (6, 3, 24, 2, 112, 56),
    (6, 5, 40, 2, 56, 28),
    (6, 3, 80, 3, 28, 14),
    (6, 5, 112, 3, 14, 14),
    (6, 5, 192, 4, 14, 7),
    (6, 3, 320, 1, 7, 7),
]


def mbconv_blocks():
    """(index, cin, mid, cout, q, kernel, input size, output size, residual) of the 16 blocks."""
    cin, index = 32, 0
    for t, k, cout, repeats, size_in, size_out in STAGES:
        for r in range(repeats):
            a = size_in if r == 0 else size_out
            yield index, cin, t * cin, cout, max(1, cin // 4), k, a, size_out, r > 0
            cin, index = cout, index + 1


class Census:
    """Hand totals: dot-product MACs and outputs, bias adds, swish and sigmoid elements, SE scales, means, residuals."""

    def __init__(self):
        self.macs = 27 * 32 * 112**2 + 320 * 1280 * 7**2 + 1280 * 1000
        self.outputs = 32 * 112**2 + 1280 * 7**2 + 1000
        self.bias = self.outputs  # stem and head batch norms folded, the fc's bias
        self.swish = 32 * 112**2 + 1280 * 7**2
        self.sigmoid = self.scale = self.residual = 0
        self.mean_adds, self.mean_mults = 1280 * (7**2 - 1), 1280
        for _, cin, mid, cout, q, k, a, s, residual in mbconv_blocks():
            convs = [(k * k, mid * s * s), (mid, q), (q, mid), (mid, cout * s * s)]  # (terms, outputs)
            if mid != cin:
                convs.append((cin, mid * a * a))
                self.swish += mid * a * a
            self.macs += sum(n * outs for n, outs in convs)
            self.outputs += sum(outs for _, outs in convs)
            self.bias += sum(outs for _, outs in convs)  # folded BNs after expand/depthwise/project; SE biases
            self.swish += mid * s * s + q
            self.sigmoid += mid
            self.scale += mid * s * s
            self.mean_adds += mid * (s * s - 1)
            self.mean_mults += mid
            self.residual += cout * s * s if residual else 0


@pytest.fixture(scope="module")
def report(meta_count):
    return meta_count("efficientnet-b0", torch.empty(1, 3, 224, 224))


def test_every_block_against_its_formula(report):
    blocks = list(mbconv_blocks())
    for i, cin, mid, cout, q, k, a, s, residual in blocks:
        if mid != cin:
            assert report.layer(f"blocks.{i}.expand.0").mults == cin * mid * a * a
            assert report.layer(f"blocks.{i}.expand.2").mults == 3 * mid * a * a  # swish
        assert report.layer(f"blocks.{i}.depthwise.0").mults == k * k * mid * s * s
        assert report.layer(f"blocks.{i}.se.reduce").mults == mid * q
        assert report.layer(f"blocks.{i}.se.expand").adds == (q - 1) * mid + mid  # n - 1 adds + the bias
        se = report.layer(f"blocks.{i}.se")  # mean, sigmoid and the channel scale
        assert se.mults == mid + 2 * mid + mid * s * s
        assert se.adds == mid * (s * s - 1) + mid
        assert report.layer(f"blocks.{i}.project.0").mults == mid * cout * s * s
        adds = {row.name: row.adds for row in report.layers}.get(f"blocks.{i}", 0)  # no row without a residual
        assert adds == (cout * s * s if residual else 0)


def test_totals_by_family(report):
    hand = Census()
    assert round(hand.macs / 1e7) == 39  # published: "0.39B FLOPs" (multiply-adds)
    dot = report.family("dot_product")
    assert (dot.mults, dot.adds) == (hand.macs, hand.macs - hand.outputs)
    assert report.family("bias").adds == hand.bias
    silu = report.family("silu")
    assert (silu.mults, silu.adds) == (3 * hand.swish, hand.swish)
    sigmoid = report.family("sigmoid")
    assert (sigmoid.mults, sigmoid.adds) == (2 * hand.sigmoid, hand.sigmoid)
    assert report.family("mul").mults == hand.scale
    mean = report.family("mean")
    assert (mean.mults, mean.adds) == (hand.mean_mults, hand.mean_adds)
    assert report.family("add").adds == hand.residual
    assert report.mults == hand.macs + 3 * hand.swish + 2 * hand.sigmoid + hand.scale + hand.mean_mults
    assert not report.uncounted and report.others == 0
    # storage: every batch norm follows a conv (one bias per channel kept of its two values): 5,288,548 - 21,008
    assert report.params == 5_288_548 - 21_008
