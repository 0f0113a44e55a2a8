"""Op probes: one small module per op, each against counts derived by hand from the rules (rules.md §1.4, §2).

Conventions used in the references: a dot product of length n is n mults and n - 1 adds; a bias 1 add per
output; ReLU 1 mult; the TOML's prices for the other families (quoted next to each reference).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _probes import Fn
from torch import nn

import micronet_score as ms


def counts(model: nn.Module, *inputs, **kw) -> tuple[float, float, float]:
    r = ms.count(model.eval(), *inputs, samples=1, **kw)
    assert not r.uncounted, r.uncounted
    return r.mults, r.adds, r.others


def dot(n: int, outputs: int) -> tuple[int, int]:
    return n * outputs, (n - 1) * outputs


torch.manual_seed(0)
X = torch.randn(1, 97, 256)
IMG = torch.randn(1, 16, 32, 32)
Q = torch.randn(1, 8, 97, 32)


def test_linear():
    m, a = dot(256, 97 * 256)
    assert counts(nn.Linear(256, 256), X) == (m, a + 97 * 256, 0)


def test_linear_no_bias_functional():
    w = torch.randn(128, 256)
    m, a = dot(256, 97 * 128)
    assert counts(Fn(lambda mods, x: F.linear(x, w)), X) == (m, a, 0)


@pytest.mark.parametrize(
    "conv, x, n, outputs",
    [
        (nn.Conv2d(16, 32, 3, padding=1, bias=False), IMG, 9 * 16, 32 * 32 * 32),
        (nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), IMG, 9, 16 * 32 * 32),  # depthwise
        (nn.Conv2d(16, 32, 3, padding=1, groups=4, bias=False), IMG, 9 * 4, 32 * 32 * 32),  # grouped
        (nn.Conv2d(16, 32, 3, padding=2, dilation=2, bias=False), IMG, 9 * 16, 32 * 32 * 32),  # dilated
        (nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), IMG, 9 * 16, 32 * 16 * 16),  # strided
        (nn.Conv1d(16, 8, 5, bias=False), torch.randn(1, 16, 40), 5 * 16, 8 * 36),
        (nn.Conv3d(4, 8, 3, padding=1, bias=False), torch.randn(1, 4, 6, 6, 6), 27 * 4, 8 * 216),
    ],
)
def test_convolutions(conv, x, n, outputs):
    assert counts(conv, x) == (*dot(n, outputs), 0)


def test_conv_bias():
    m, a = dot(9 * 16, 32 * 32 * 32)
    assert counts(nn.Conv2d(16, 32, 3, padding=1), IMG) == (m, a + 32 * 32 * 32, 0)


def test_transposed_conv():
    # 16 -> 8 channels, 4x4 kernel, stride 2, 16x16 -> 32x32: every input element meets 8 * 16 taps.
    x = torch.randn(1, 16, 16, 16)
    macs = 16 * 16 * 16 * 8 * 16
    outputs = 8 * 32 * 32
    assert counts(nn.ConvTranspose2d(16, 8, 4, 2, 1, bias=False), x) == (macs, macs - outputs, 0)


def attention_counts(b_h: int, lq: int, lk: int, e: int, ev: int) -> tuple[int, int, int]:
    scores = b_h * lq * lk
    m1, a1 = dot(e, scores)
    m2, a2 = dot(lk, b_h * lq * ev)
    # scale (rule set policy "per_score", as eager code divides the scores): 1 mult per score;
    # softmax per score: 1 mult, 1 add, 1 exp; -1 add per row
    return m1 + m2 + scores + scores, a1 + a2 + scores - b_h * lq, scores


def test_sdpa():
    assert counts(Fn(lambda mods, q: F.scaled_dot_product_attention(q, q, q)), Q) == attention_counts(8, 97, 97, 32, 32)


def test_sdpa_meta_matches_cpu_dot_products():
    # on meta torch picks the math kernel (it scales q and k by sqrt(scale) each); the attention is priced once
    # per call whichever kernel runs, so the totals equal the fused kernel's hand formula
    r = ms.count(Fn(lambda mods, q: F.scaled_dot_product_attention(q, q, q)), Q.to("meta"), samples=1)
    assert (r.mults, r.adds, r.others) == attention_counts(8, 97, 97, 32, 32)


@pytest.mark.parametrize(
    "fn",
    [
        lambda mods, q: torch.matmul(q, q.transpose(-1, -2)),
        lambda mods, q: q @ q.transpose(-1, -2),
        lambda mods, q: torch.bmm(q[0], q[0].transpose(-1, -2)),
        lambda mods, q: torch.einsum("bhld,bhmd->bhlm", q, q),
    ],
    ids=["matmul", "at", "bmm", "einsum"],
)
def test_matmul_family(fn):
    assert counts(Fn(fn), Q) == (*dot(32, 8 * 97 * 97), 0)


def mha_counts(batch: int, length: int, embed: int, heads: int, need_weights: bool) -> tuple[int, int, int]:
    proj_m, proj_a = dot(embed, batch * length * 3 * embed)
    out_m, out_a = dot(embed, batch * length * embed)
    am, aa, ao = attention_counts(batch * heads, length, length, embed // heads, embed // heads)
    mults = proj_m + out_m + am
    adds = proj_a + batch * length * 3 * embed + out_a + batch * length * embed + aa
    if need_weights:  # average the weights over heads: (H - 1) adds and 1 division per weight
        weights = batch * length * length
        mults += weights
        adds += (heads - 1) * weights
    return mults, adds, ao


@pytest.mark.parametrize("grad", [True, False])
def test_multihead_attention(grad):
    mha = nn.MultiheadAttention(256, 8, batch_first=True)
    with torch.set_grad_enabled(grad):
        assert counts(Fn(lambda mods, x: mods[0](x, x, x)[0], mha), X) == mha_counts(1, 97, 256, 8, True)


def encoder_counts(length: int, d: int, heads: int, ff: int) -> tuple[int, int, int]:
    m, a, o = mha_counts(1, length, d, heads, False)
    e = length * d
    f1m, f1a = dot(d, length * ff)
    f2m, f2a = dot(ff, e)
    # layer norm x2: per element 2 mults 3 adds (+ affine 1 mult 1 add); per row 2 mults, -1 add, 1 rsqrt
    ln_m, ln_a, ln_o = 2 * (3 * e + 2 * length), 2 * (4 * e - length), 2 * length
    gelu = length * ff  # 3 mults, 1 add, 1 transcendental each
    mults = m + f1m + f2m + ln_m + 3 * gelu
    adds = a + f1a + length * ff + f2a + e + 2 * e + ln_a + gelu
    return mults, adds, o + ln_o + gelu


@pytest.mark.parametrize("grad", [True, False])
def test_transformer_encoder_layer(grad):
    layer = nn.TransformerEncoderLayer(256, 8, 768, dropout=0.0, activation="gelu", batch_first=True)
    with torch.set_grad_enabled(grad):
        assert counts(layer, X) == encoder_counts(97, 256, 8, 768)


def lstm_counts(steps: int, i: int, h: int) -> tuple[int, int, int]:
    m1, a1 = dot(i, steps * 4 * h)
    m2, a2 = dot(h, steps * 4 * h)
    units = steps * h
    # 2 biases and the gate sum per gate value; cell: 3 sigmoid (2m+1a), 2 tanh (1 other), 3 mults, 1 add
    return m1 + m2 + 6 * units + 3 * units, a1 + a2 + 12 * units + 3 * units + units, 2 * units


def test_lstm():
    x = torch.randn(97, 1, 64)
    assert counts(Fn(lambda mods, x: mods[0](x)[0], nn.LSTM(64, 64)), x) == lstm_counts(97, 64, 64)


def test_lstm_meta_decomposition_agrees():
    x = torch.randn(5, 1, 16)
    lstm = nn.LSTM(16, 16)
    cpu = counts(Fn(lambda mods, x: mods[0](x)[0], lstm), x)
    meta = counts(Fn(lambda mods, x: mods[0](x)[0], lstm.to("meta")), x.to("meta"))
    assert cpu == meta == lstm_counts(5, 16, 16)


def test_gru():
    steps, i, h = 20, 32, 32
    m1, a1 = dot(i, steps * 3 * h)
    m2, a2 = dot(h, steps * 3 * h)
    u = steps * h
    # biases 2 per gate value; r,z: gate sum (1 add) + sigmoid (2m 1a); n: r*h_n (1m), +x_n (1a), tanh;
    # h' = n + z*(h - n): 1 sub, 1 mult, 1 add
    expected = (m1 + m2 + 4 * u + u + u, a1 + a2 + 6 * u + 2 * u + 2 * u + u + 2 * u, u)
    assert counts(Fn(lambda mods, x: mods[0](x)[0], nn.GRU(i, h)), torch.randn(steps, 1, i)) == expected


def test_rnn():
    steps, i, h = 20, 32, 32
    m1, a1 = dot(i, steps * h)
    m2, a2 = dot(h, steps * h)
    u = steps * h
    assert counts(Fn(lambda mods, x: mods[0](x)[0], nn.RNN(i, h)), torch.randn(steps, 1, i)) == (
        m1 + m2,
        a1 + a2 + 3 * u,
        u,
    )


E = 24_832  # 97 x 256


@pytest.mark.parametrize(
    "module, per_element",
    [
        (nn.ReLU(), (1, 0, 0)),
        (nn.ReLU6(), (1, 0, 0)),
        (nn.Hardtanh(), (1, 0, 0)),
        (nn.GELU(), (3, 1, 1)),
        (nn.SiLU(), (3, 1, 0)),
        (nn.Hardswish(), (3, 1, 0)),
        (nn.Sigmoid(), (2, 1, 0)),
        (nn.Tanh(), (0, 0, 1)),
        (nn.Softplus(), (0, 1, 2)),
        (nn.ELU(), (1, 1, 2)),
        (nn.CELU(0.5), (2, 1, 2)),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "",
)
def test_activations(module, per_element):
    assert counts(module, X) == tuple(E * p for p in per_element)


def test_layer_norm():
    rows = 97
    assert counts(nn.LayerNorm(256), X) == (3 * E + 2 * rows, 4 * E - rows, rows)


def test_group_norm():
    rows = 4  # groups x batch
    n = 16 * 32 * 32
    assert counts(nn.GroupNorm(4, 16), IMG) == (3 * n + 2 * rows, 4 * n - rows, rows)


def test_batch_norm_alone_is_scale_and_shift():
    n = 16 * 32 * 32
    assert counts(nn.BatchNorm2d(16), IMG) == (n, n, 0)


def test_batch_norm_after_conv_folds_to_bias():
    conv = nn.Conv2d(16, 16, 1, bias=False)
    m, a = dot(16, 16 * 32 * 32)
    r = ms.count(nn.Sequential(conv, nn.BatchNorm2d(16)).eval(), IMG)
    assert (r.mults, r.adds) == (m, a + 16 * 32 * 32)
    assert r.params == 16 * 16 + 16  # weights + one bias per channel


def test_softmax_and_log_softmax():
    scores = torch.randn(1, 8, 97, 97)
    n, rows = scores.numel(), 8 * 97
    assert counts(nn.Softmax(-1), scores) == (n, n - rows, n)
    assert counts(Fn(lambda mods, s: F.log_softmax(s, -1)), scores) == (0, 2 * n - rows, n + rows)


def test_pools():
    n = 16 * 32 * 32
    assert counts(nn.MaxPool2d(2), IMG) == (0, 0, n - n // 4)  # 4 terms: 3 comparisons per output
    assert counts(nn.AvgPool2d(2), IMG) == (n // 4, n - n // 4, 0)
    assert counts(nn.AdaptiveAvgPool2d(1), IMG) == (16, n - 16, 0)  # counting.py GlobalAvg
    assert counts(Fn(lambda mods, x: x.mean(dim=(2, 3))), IMG) == (16, n - 16, 0)
    assert counts(Fn(lambda mods, x: x.sum(dim=-1)), IMG) == (0, n - 16 * 32, 0)


def test_interpolate():
    out = 16 * 64 * 64
    assert counts(Fn(lambda mods, x: F.interpolate(x, scale_factor=2, mode="bilinear")), IMG) == (3 * out, 6 * out, 0)
    assert counts(Fn(lambda mods, x: F.interpolate(x, scale_factor=2, mode="nearest")), IMG) == (0, 0, 0)


def test_embedding_lookup_is_free():
    assert counts(nn.Embedding(1000, 256), torch.randint(0, 1000, (1, 97))) == (0, 0, 0)


def test_elementwise_and_comparisons():
    y = torch.randn(1, 97, 256)
    assert counts(Fn(lambda mods, x: x + y), X) == (0, E, 0)
    assert counts(Fn(lambda mods, x: x * y), X) == (E, 0, 0)
    assert counts(Fn(lambda mods, x: x - y), X) == (0, E, 0)
    assert counts(Fn(lambda mods, x: x / 3.0), X) == (E, 0, 0)
    assert counts(Fn(lambda mods, x: x > y), X) == (0, 0, E)
    assert counts(Fn(lambda mods, x: torch.maximum(x, y)), X) == (0, 0, E)


def test_data_movement_is_free():
    fn = Fn(lambda mods, x: torch.cat([x.view(97, 256).t().reshape(-1), x.permute(2, 0, 1).flatten()]))
    assert counts(fn, X) == (0, 0, 0)


def test_unpriced_op_is_listed_and_strict_raises():
    model = Fn(lambda mods, x: torch.cdist(x, x))
    r = ms.count(model, X)
    # torch computes small Euclidean cdists as aten._euclidean_dist, larger ones as aten._cdist_forward
    assert [(u.module, u.calls, u.elements) for u in r.uncounted] == [("", 1, 97 * 97)]
    assert "dist" in r.uncounted[0].op and any(r.uncounted[0].op in w for w in r.warnings)
    with pytest.raises(ms.MicronetError, match="strict mode.*dist"):
        ms.count(model, X, strict=True)


def test_op_missing_from_rule_set_is_listed(tmp_path):
    from micronet_score.ruleset import load_rules

    rules = load_rules()
    ops = {k: v for k, v in rules.ops.items() if k != "gelu"}
    custom = rules.model_copy(update={"ops": ops})
    r = ms.count(nn.GELU(), X, rules=custom)
    assert r.uncounted and "gelu" in r.uncounted[0].op
    assert r.mults == 0


def test_writes_are_free_but_accumulating_writes_are_priced():
    idx = torch.tensor([0, 2, 2])
    vals = torch.ones(3, 256)
    assert counts(Fn(lambda mods, x: x[0].index_put((idx,), vals)), X) == (0, 0, 0)
    assert counts(Fn(lambda mods, x: x[0].index_put((idx,), vals, accumulate=True)), X) == (0, 3 * 256, 0)
    index = torch.zeros(1, 97, 256, dtype=torch.long)
    assert counts(Fn(lambda mods, x: torch.zeros_like(x).scatter(0, index, x)), X) == (0, 0, 0)
    assert counts(Fn(lambda mods, x: torch.zeros_like(x).scatter(0, index, x, reduce="add")), X) == (0, E, 0)
    assert counts(Fn(lambda mods, x: torch.ones_like(x).scatter(0, index, x, reduce="multiply")), X) == (E, 0, 0)


def test_ops_that_compare_or_sum_are_not_free():
    """col2im (fold) sums overlapping patches: listed as uncounted (no price); nonzero and equal compare every
    element: one comparison each."""
    cols = torch.randn(1, 16 * 9, 30 * 30)
    r = ms.count(Fn(lambda mods, x: F.fold(cols, (32, 32), 3)), X)
    assert any("col2im" in u.op for u in r.uncounted), r.uncounted
    assert counts(Fn(lambda mods, x: x.nonzero()), X) == (0, 0, E)
    # torch.equal compares the E elements, then the sum adds them: E - 1 adds
    assert counts(Fn(lambda mods, x: x.sum() if torch.equal(x, x) else x), X) == (0, E - 1, E)

