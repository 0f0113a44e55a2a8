"""Op-pricing defects of issue 14, each against a reference derived by hand from the rules (rules.md 1.3-1.4)
or measured through torch's own kernels (one-hot probes), never against the counter itself.

Conventions: a dot product of length n is n mults and n - 1 adds; the TOML's prices of the other families are
quoted next to each reference.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _probes import Fn
from torch import nn

import micronet_score as ms
from micronet_score.errors import MicronetError

BUNDLED = Path(__file__).resolve().parents[1] / "rules" / "micronet-2019.toml"


def count(fn, *inputs, modules=(), **kw):
    report = ms.count(Fn(fn, *modules).eval(), *inputs, samples=1, **kw)
    assert not report.uncounted, report.uncounted
    return report


def dot(n: int, outputs: int) -> tuple[int, int]:
    return n * outputs, (n - 1) * outputs


# --- 2. adaptive pooling: true windows, never a negative count ------------------------------------------------


def window_terms(pool, channels: int, size: tuple[int, int]) -> int:
    """Terms summed by ``pool`` measured through torch's kernel: each one-hot input feeds the outputs whose
    window holds it; counting those outputs over all inputs counts every (window, element) pair."""
    h, w = size
    ones = torch.eye(h * w).reshape(h * w, 1, h, w)
    return channels * int((pool(ones) != 0).sum())


@pytest.mark.parametrize(("size", "out"), [((8, 8), (5, 7)), ((1, 1), (7, 7)), ((7, 5), (3, 4)), ((6, 6), (6, 6))])
def test_adaptive_avg_pool_prices_its_true_windows(size, out):
    x = torch.rand(1, 4, *size) + 1
    terms = window_terms(lambda t: F.adaptive_avg_pool2d(t, out), 4, size)
    outputs = 4 * out[0] * out[1]
    r = count(lambda m, x: F.adaptive_avg_pool2d(x, out), x)
    # avg_pool: per window of n, n - 1 adds and 1 division (a mult)
    assert (r.mults, r.adds, r.others) == (outputs, terms - outputs, 0)


def test_adaptive_pooling_figures_of_the_issue():
    # issue 14: AdaptiveAvgPool2d 8x8 -> 5x7 over 4 channels sums 532 terms more than outputs (the old 116 was
    # one term per input element); 1x1 -> 7x7 (a VGG at 32x32) has as many terms as outputs
    assert count(lambda m, x: F.adaptive_avg_pool2d(x, (5, 7)), torch.rand(1, 4, 8, 8)).adds == 532
    vgg = count(lambda m, x: F.adaptive_avg_pool2d(x, 7), torch.rand(1, 512, 1, 1))
    assert (vgg.mults, vgg.adds) == (512 * 49, 0)


def test_adaptive_max_pool_comparisons_are_never_negative():
    x = torch.rand(1, 3, 1, 1)
    assert count(lambda m, x: F.adaptive_max_pool2d(x, 7), x).others == 0
    y = torch.rand(1, 3, 8, 8)
    terms = window_terms(lambda t: F.adaptive_max_pool2d(t + 1, (5, 7)) * 0 + F.adaptive_avg_pool2d(t, (5, 7)), 3,
                         (8, 8))
    assert count(lambda m, x: F.adaptive_max_pool2d(x, (5, 7)), y).others == terms - 3 * 35


def test_a_negative_count_stops_the_count_naming_op_and_module(tmp_path):
    """A rule file with such a price is refused when it is read (per_element + per_group < 0); the counter's own
    guard stays for rule sets built in memory (validation bypassed) and for any bug of a handler."""
    text = BUNDLED.read_text().replace("[ops.sum]\nper_element = { adds = 1 }\nper_group = { adds = -1 }",
                                       "[ops.sum]\nper_element = { adds = 1 }\nper_group = { adds = -5 }")
    assert "adds = -5" in text
    rules = tmp_path / "negative.toml"
    rules.write_text(text)
    from micronet_score.errors import CountingBug, RuleError
    from micronet_score.ruleset import Cost, OpRule, load_rules

    with pytest.raises(RuleError, match=r"ops\.sum: .*must not be negative"):
        load_rules(rules)
    bundled = load_rules()
    negative = OpRule.model_construct(per_element=Cost(adds=1), per_group=Cost.model_construct(mults=0.0, adds=-5.0,
                                                                                                 others=0.0))
    unchecked = bundled.model_copy(update={"ops": {**bundled.ops, "sum": negative}})
    model = nn.Sequential(Fn(lambda m, x: x.sum(-1)))
    with pytest.raises(CountingBug, match=r"aten\.sum in module '?0"):
        ms.count(model, torch.rand(1, 3), rules=unchecked, samples=1)


# --- 3. mixture of experts ---------------------------------------------------------------------------------


def test_grouped_mm_prices_the_products_of_the_routed_tokens():
    tokens, k, n, experts = 6, 8, 16, 3
    a, b = torch.randn(tokens, k), torch.randn(experts, k, n)
    every = count(lambda m, a, b: torch._grouped_mm(a, b, offs=torch.tensor([2, 4, 6], dtype=torch.int32)), a, b)
    assert (every.mults, every.adds) == dot(k, tokens * n)
    # rows past the last offset belong to no expert: only the 4 routed rows are multiplied
    some = count(lambda m, a, b: torch._grouped_mm(a, b, offs=torch.tensor([1, 3, 4], dtype=torch.int32)), a, b)
    assert (some.mults, some.adds) == dot(k, 4 * n)


def test_routing_ops_are_priced():
    x = torch.randn(5, 8)
    # top_k: k passes of a max, k (n - 1) comparisons per row
    assert count(lambda m, x: torch.topk(x, 2).values, x).others == 5 * 2 * 7
    # sort: n ceil(log2 n) comparisons per row
    assert count(lambda m, x: torch.sort(x).values, x).others == 5 * 8 * 3
    assert count(lambda m, x: torch.argsort(x, dim=0), x).others == 8 * 5 * 3
    # cumsum: n - 1 adds per row
    assert count(lambda m, x: torch.cumsum(x, dim=1), x).adds == 5 * 7
    # floor_divide: a division (mult) and a rounding per element
    r = count(lambda m, x: torch.floor_divide(x, 3), x)
    assert (r.mults, r.others) == (40, 40)
    # histogram: 1 mult, 2 adds, 3 others per input element
    r = count(lambda m, x: torch.histc(x, bins=4, min=-1, max=1), x)
    assert (r.mults, r.adds, r.others) == (40, 80, 120)
    # aminmax: 2 (n - 1) comparisons per row
    assert count(lambda m, x: torch.aminmax(x, dim=1).max, x).others == 2 * 5 * 7
    # index_add_: one add per source element
    r = count(lambda m, x: torch.zeros(3, 8).index_add_(0, torch.tensor([0, 2, 2, 1, 0]), x), x)
    assert r.adds == 40


# --- 4. addmm / baddbmm scales -------------------------------------------------------------------------------


def test_addmm_alpha_and_beta_other_than_one_are_multiplies():
    bias, x, w = torch.randn(5), torch.randn(3, 4), torch.randn(4, 5)
    m, a = dot(4, 15)
    plain = count(lambda mods, b, x, w: torch.addmm(b, x, w), bias, x, w)
    assert (plain.mults, plain.adds) == (m, a + 15)
    scaled = count(lambda mods, b, x, w: torch.addmm(b, x, w, beta=0.5, alpha=2.0), bias, x, w)
    assert (scaled.mults, scaled.adds) == (m + 15 + 15, a + 15)


def test_baddbmm_with_bloom_attention_scaling():
    # Bloom: baddbmm(alibi, q, k^T, beta=1.0, alpha=1/sqrt(d)): the scale is one multiply per score
    alibi, q, k = torch.randn(2, 3, 5), torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    r = count(lambda mods, b, q, k: torch.baddbmm(b, q, k, beta=1.0, alpha=0.5), alibi, q, k)
    m, a = dot(4, 30)
    assert (r.mults, r.adds) == (m + 30, a + 30)


# --- 5. nested tensors -------------------------------------------------------------------------------------------


def encoder_layer_counts(length: int, d: int, heads: int, ff: int) -> tuple[int, int, int]:
    """One post-norm encoder layer (relu) on one sequence of ``length``, no mask, by hand."""
    e, scores = length * d, heads * length * length
    qkv_m, qkv_a = dot(d, 3 * e)
    out_m, out_a = dot(d, e)
    s_m, s_a = dot(d // heads, scores)
    v_m, v_a = dot(length, e)
    f1_m, f1_a = dot(d, length * ff)
    f2_m, f2_a = dot(ff, e)
    # scale 1 mult per score; softmax 1 mult 1 add 1 exp per score, -1 add per row; layer norm x2 with affine:
    # 3 mults 4 adds per element, 2 mults -1 add 1 rsqrt per row; relu 1 mult; 2 residual adds per element
    mults = qkv_m + out_m + s_m + v_m + f1_m + f2_m + 2 * scores + 2 * (3 * e + 2 * length) + length * ff
    adds = (qkv_a + 3 * e + out_a + e + s_a + v_a + scores - heads * length + f1_a + length * ff + f2_a + e
            + 2 * e + 2 * (4 * e - length))
    return mults, adds, scores + 2 * length


def test_transformer_encoder_with_padding_mask_prices_nested_sequences_by_their_lengths():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(2, 5, 16)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        report = ms.count(encoder, x, samples=1, src_key_padding_mask=pad)
    assert not report.uncounted
    five, three = encoder_layer_counts(5, 16, 2, 32), encoder_layer_counts(3, 16, 2, 32)
    for name in ("layers.0", "layers.1"):
        row = report.layer(name)
        assert [row.mults, row.adds, row.others] == [a + b for a, b in zip(five, three, strict=True)]
    # the padded run would pay 2 full sequences of 5; the encoder's own mask handling only compares


# --- 6. fp16 / bf16 widths ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_and_products_count_at_16_bits(dtype):
    model = nn.Linear(16, 8).to(dtype).eval()
    r = ms.count(model, torch.randn(3, 16, dtype=dtype), samples=1)
    assert r.params == pytest.approx((16 * 8 + 8) * 16 / 32)
    m, a = dot(16, 24)
    # mults at the widest input (16 bits), adds at the 32-bit accumulator (rules 1.4)
    assert r.flops == pytest.approx(m * 16 / 32 + (a + 24))


def test_autocast_products_count_at_the_cast_width_and_storage_stays_fp32():
    model = nn.Linear(16, 8).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = ms.count(model, torch.randn(3, 16), samples=1)
    m, a = dot(16, 24)
    assert r.params == pytest.approx(16 * 8 + 8)
    assert r.flops == pytest.approx(m * 16 / 32 + (a + 24))


def test_freebie_is_allowed_for_an_fp16_model():
    model = nn.Linear(16, 8).half().eval()
    r = ms.count(model, torch.randn(3, 16).half(), samples=1, freebie=True)
    m, a = dot(16, 24)
    assert r.params == pytest.approx((16 * 8 + 8) / 2)
    assert r.flops == pytest.approx(m / 2 + a + 24)


def test_double_precision_weights_and_products_count_at_64_bits():
    model = nn.Linear(16, 8).double().eval()
    r = ms.count(model, torch.randn(3, 16, dtype=torch.float64), samples=1)
    assert r.params == pytest.approx((16 * 8 + 8) * 64 / 32)  # two 32-bit units per value
    m, a = dot(16, 24)
    # mults at the widest input (64 bits); adds at the rule set's 32-bit accumulator width (rules 1.4)
    assert r.flops == pytest.approx(m * 64 / 32 + (a + 24))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.int8])
def test_freebie_is_refused_for_weights_stored_below_16_bits_by_their_dtype(dtype):
    model = nn.Linear(16, 8).eval().requires_grad_(False)
    model.weight.data = model.weight.data.to(dtype)
    with pytest.raises(MicronetError, match="freebie is not allowed: tensor 'weight' .* is 8 bits"):
        ms.count(model, torch.randn(3, 16), samples=1, freebie=True)


def test_freebie_is_refused_for_int8_activations():
    class Int8Square(nn.Module):
        def forward(self, x):
            q = x.to(torch.int8)
            return q * q

    with pytest.raises(MicronetError, match="freebie is not allowed: an operand of aten.mul"):
        ms.count(Int8Square(), torch.randn(3, 16), samples=1, freebie=True)


# --- 7. one attention, one price ------------------------------------------------------------------------------------


def causal_attention_counts(heads: int, length: int, dim: int) -> tuple[int, int, int]:
    """Dense causal attention by the rule set's policy: scores as dot products, the scale 1 mult per score, the
    mask 1 add per score, softmax (1 mult, 1 add, 1 exp per score, -1 add per row), values as dot products."""
    scores = heads * length * length
    m1, a1 = dot(dim, scores)
    m2, a2 = dot(length, heads * length * dim)
    return m1 + m2 + 2 * scores, a1 + a2 + scores + scores - heads * length, scores


Q = torch.randn(1, 4, 9, 8)
CAUSAL = torch.ones(9, 9, dtype=torch.bool).tril()
FUTURE = ~CAUSAL
ADDITIVE = torch.zeros(9, 9).masked_fill(FUTURE, float("-inf"))


@pytest.mark.parametrize(
    "attend",
    [
        lambda m, q: F.scaled_dot_product_attention(q, q, q, is_causal=True),
        lambda m, q: F.scaled_dot_product_attention(q, q, q, attn_mask=CAUSAL),
        lambda m, q: F.scaled_dot_product_attention(q, q, q, attn_mask=ADDITIVE),
        lambda m, q: torch.ops.aten._scaled_dot_product_attention_math(q, q, q, is_causal=True)[0],
        lambda m, q: (
            (q @ q.transpose(-1, -2) / math.sqrt(8)).masked_fill(FUTURE, float("-inf")).softmax(-1) @ q
        ),
    ],
    ids=["is_causal", "bool_mask", "float_mask", "math_path", "eager_masked_fill"],
)
def test_causal_attention_costs_the_same_on_every_path(attend):
    # the eager path's masked_fill is a comparison per score where the policy prices an add: compare its
    # mults and dot products, and the totals of the others
    r = count(attend, Q)
    mults, adds, others = causal_attention_counts(4, 9, 8)
    assert r.mults == mults
    assert r.adds + r.others == adds + others


def test_sdpa_math_kernel_costs_what_the_fused_kernel_costs():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fused = count(lambda m, q: F.scaled_dot_product_attention(q, q, q), Q)
    with sdpa_kernel(SDPBackend.MATH):
        math_path = count(lambda m, q: F.scaled_dot_product_attention(q, q, q), Q)
    assert (fused.mults, fused.adds, fused.others) == (math_path.mults, math_path.adds, math_path.others)


# --- 8. integer powers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exponent", "mults", "others"),
    [(2, 1, 0), (3, 2, 0), (4, 2, 0), (5, 3, 0), (1, 0, 0), (0.5, 0, 1), (2.5, 0, 1)],
)
def test_integer_powers_are_multiplies(exponent, mults, others):
    # square-and-multiply: x^3 = x^2 * x, x^4 = (x^2)^2, x^5 = (x^2)^2 * x; other exponents are transcendental
    x = torch.rand(10) + 0.5
    r = count(lambda m, x: x**exponent, x)
    assert (r.mults, r.others) == (10 * mults, 10 * others)


def test_negative_integer_power_adds_a_division():
    r = count(lambda m, x: torch.pow(x, -2), torch.rand(10) + 0.5)
    assert (r.mults, r.others) == (20, 0)  # x * x, then 1 / (x * x) priced as a multiply


# --- 9. free and priced resampling, profiler markers, all / any --------------------------------------------------


def test_nearest_exact_upsampling_is_free():
    r = count(lambda m, x: F.interpolate(x, scale_factor=2, mode="nearest-exact"), torch.rand(1, 2, 4, 4))
    assert (r.mults, r.adds, r.others) == (0, 0, 0)


def test_bicubic_upsampling_is_priced_per_output():
    r = count(lambda m, x: F.interpolate(x, size=(6, 10), mode="bicubic"), torch.rand(1, 2, 3, 5))
    # 5 cubic interpolations of 4 taps per output: 20 mults, 15 adds
    assert (r.mults, r.adds) == (20 * 120, 15 * 120)


def antialias_taps(size_in: int, size_out: int) -> int:
    """Weights an antialiased bilinear resize applies along one axis, measured through torch: each one-hot input
    row reaches the outputs that weigh it."""
    ones = torch.eye(size_in).reshape(size_in, 1, 1, size_in)
    return int((F.interpolate(ones, size=(1, size_out), mode="bilinear", antialias=True) != 0).sum())


def test_antialiased_bilinear_is_priced_as_its_weighted_sums():
    x = torch.rand(1, 2, 12, 20)
    r = count(lambda m, x: F.interpolate(x, size=(5, 7), mode="bilinear", antialias=True), x)
    # separable: along the width for each input row, then along the height for each output column
    width_terms, height_terms = antialias_taps(20, 7), antialias_taps(12, 5)
    mults = 2 * (12 * width_terms + 7 * height_terms)
    assert r.mults == mults
    assert r.adds == mults - 2 * (12 * 7 + 5 * 7)


def test_profiler_markers_are_free_in_strict_mode():
    def forward(m, x):
        with torch.autograd.profiler.record_function("block"):
            return m[0](x)

    r = ms.count(Fn(forward, nn.Linear(4, 3)).eval(), torch.randn(2, 4), samples=1, strict=True)
    assert r.mults == 2 * 3 * 4


def test_all_and_any_compare_every_element():
    x = torch.rand(4, 6)
    assert count(lambda m, x: (x > 0.5).all(), x).others == 24 + 24
    assert count(lambda m, x: (x > 0.5).any(dim=1), x).others == 24 + 24


# --- 12. torch.ao FakeQuantize --------------------------------------------------------------------------------------


def test_fake_quantize_module_marks_its_output_at_its_range_width():
    from torch.ao.quantization import FakeQuantize

    fq = FakeQuantize()  # quint8: quant_min 0, quant_max 255 -> 8 bits
    model = nn.Sequential(fq, nn.Linear(16, 4, bias=False)).eval()
    model(torch.randn(8, 16))  # observe a range
    model.apply(torch.ao.quantization.disable_observer)
    r = ms.count(model, torch.randn(1, 16), samples=1, weight_bits={"1.weight": 8})
    m, a = dot(16, 4)
    # FakeQuantize.forward tests its two uint8 flags (observer_enabled[0] == 1, fake_quant_enabled[0] == 1):
    # 2 comparisons of 8-bit values
    assert r.flops == pytest.approx(m * 8 / 32 + a + 2 * 8 / 32)


# --- structure: prices and policies are data, handlers registered once -------------------------------------------


def test_an_op_priced_twice_is_refused():
    from micronet_score.counting.ops import priced

    with pytest.raises(ValueError, match="priced twice"):
        priced("mm")(lambda op, prices: None)


def test_quantized_scale_widths_come_from_the_rule_set(tmp_path):
    model = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(16, 8)), {nn.Linear}, dtype=torch.qint8)
    x = torch.randn(2, 16)
    text = BUNDLED.read_text()
    assert "scale_bits = 32" in text
    rules = tmp_path / "half-scales.toml"
    rules.write_text(text.replace("scale_bits = 32", "scale_bits = 16").replace('zero_point_bits = "values"',
                                                                               "zero_point_bits = 4"))
    full, half = ms.count(model, x, samples=1), ms.count(model, x, rules=str(rules), samples=1)
    # one per-tensor scale (32 -> 16 bits) and one zero point (8 -> 4 bits), in 32-bit units
    assert full.params - half.params == pytest.approx((32 - 16) / 32 + (8 - 4) / 32)
