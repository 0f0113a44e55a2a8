"""The bundled baselines against their hand-derived counts (rules.md §4), and the two backends against each other."""

from __future__ import annotations

import pytest
import torch
from fvcore.nn import FlopCountAnalysis
from micronet_score.models import registry

import micronet_score as ms


def build_meta(name: str, **config):
    spec = registry.get(name)
    with torch.device("meta"):
        return spec.build({**spec.default_config, **config}).eval()


def wrn_macs(depth: int = 28, k: int = 10, classes: int = 100) -> int:
    """Convolution and classifier multiply-accumulates of a pre-activation WRN on 32x32, by hand."""
    n = (depth - 4) // 6
    widths, sizes = [16 * k, 32 * k, 64 * k], [32 * 32, 16 * 16, 8 * 8]
    macs = 9 * 3 * 16 * 1024
    cin = 16
    for w, hw in zip(widths, sizes, strict=True):
        macs += (9 * cin * w + 9 * w * w + cin * w) * hw  # first block with its 1x1 shortcut
        macs += (n - 1) * 2 * 9 * w * w * hw
        cin = w
    return macs + 64 * k * classes


def test_wrn_28_10():
    model = build_meta("wrn-28-10")
    assert sum(p.numel() for p in model.parameters()) == 36_536_884
    r = ms.count(model, torch.empty(1, 3, 32, 32, device="meta"), track="cifar100")
    dot = r.family("dot_product")
    assert dot.mults == wrn_macs()
    assert abs((r.mults + r.adds) - 10.49e9) / 10.49e9 < 0.005
    # residual adds: 3 groups x 4 blocks of (width x size)
    assert r.family("add").adds == 4 * (160 * 1024 + 320 * 256 + 640 * 64)
    assert any("meta" in w for w in r.warnings)  # density unknown on meta: counted dense, and said so
    assert r.score == pytest.approx(r.params / 36.5e6 + r.flops / 10.49e9)


def test_mobilenet_v2_14():
    model = build_meta("mobilenet-v2")
    r = ms.count(model, torch.empty(1, 3, 224, 224, device="meta"), track="imagenet")
    assert r.family("dot_product").mults == 582_195_824
    assert sum(p.numel() for p in model.parameters()) == 6_108_776
    assert r.params == 6_084_808  # every BN follows a conv: one bias per channel (rules.md §4.2)


def test_lstm_baseline_per_token():
    model = build_meta("lstm-baseline")
    tokens = torch.zeros(1, 4, dtype=torch.long, device="meta")
    r = ms.count(model, tokens, track="wikitext103", samples=4)
    weights = 267_735 * 512 + 4 * 2048 * (512 + 2048) + 2048 * 512
    assert weights == pytest.approx(159e6, rel=1e-3)  # the published baseline: 159M parameters (rules.md, baselines)
    dot = r.family("dot_product")
    assert dot.mults == weights  # every weight used once per token; the embedding lookup is free
    # n - 1 adds per output + 1 add per bias element (LSTM 2 x 4 x 2048, softmax 267,735; projection has none)
    assert dot.adds + r.family("bias").adds == weights - 512
    assert r.per == "token"
    assert [row.name for row in r.layers if row.name == "embedding"] == ["embedding"]
    assert r.layer("embedding").storage == 267_735 * 512  # tied: counted once


def _small_models():
    from micronet_score.models.mobilenet_v2 import MobileNetV2
    from micronet_score.models.wrn import WideResNet

    torch.manual_seed(0)
    return [
        ("wrn-16-2", WideResNet(16, 2).eval(), torch.randn(1, 3, 32, 32)),
        ("mobilenet-v2-0.5", MobileNetV2(0.5).eval(), torch.randn(1, 3, 64, 64)),
    ]


@pytest.mark.parametrize("name, model, x", _small_models(), ids=lambda v: v if isinstance(v, str) else "")
def test_fvcore_backend_agrees(name, model, x):
    """fvcore traces these (reduced width and input for time); the LSTM baseline's aten::lstm it cannot price.

    Dot products must agree exactly. All other ops agree too for these models; storage differs by design: the
    trace sees no values, so the fvcore backend stores every batch-norm parameter instead of the folded bias.
    """
    a = ms.count(model, x)
    b = ms.count(model, x, backend="fvcore")
    # fvcore's own flop count (its handles, not costs.py): one per multiply-accumulate of conv and linear
    own = FlopCountAnalysis(model, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    macs = sum(v for op, v in own.by_operator().items() if op in ("conv", "linear", "addmm", "matmul", "bmm"))
    assert a.family("dot_product").mults == macs
    assert a.family("dot_product").mults == b.family("dot_product").mults
    assert a.family("dot_product").adds == b.family("dot_product").adds
    assert (a.mults, a.adds, a.others) == (b.mults, b.adds, b.others)
    assert not b.uncounted
    rows_a = {row.name: row.storage for row in a.layers if row.type != "BatchNorm2d"}
    rows_b = {row.name: row.storage for row in b.layers if row.type != "BatchNorm2d" and row.storage}
    assert {k: v for k, v in rows_a.items() if v} == rows_b
