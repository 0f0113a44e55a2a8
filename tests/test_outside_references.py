"""Dot products against the expected numbers of two other projects' test suites, ported as facts.

PyTorch ``test/test_flop_counter.py`` (torch.utils.flop_counter) counts 2 FLOPs per multiply-accumulate;
fvcore ``tests/test_flop_count.py`` (fvcore.nn.flop_count) counts 1 per multiply-accumulate. A dot product of
length n is n mults here, so each expected figure is the number of multiplies of the dot products: PyTorch's
figure halved, fvcore's as it is. Only the forward figures are ported (micronet-score counts inference); where a
PyTorch figure includes a backward pass, the ratio that test states is used to recover the forward part.
The test code is ours; the numbers are theirs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _probes import Fn
from torch import nn

import micronet_score as ms


def dot_mults(model: nn.Module, *inputs, **kw) -> float:
    report = ms.count(model.eval(), *inputs, samples=1, **kw)
    assert not report.uncounted, report.uncounted
    return report.family("dot_product").mults if any(o.family == "dot_product" for o in report.ops) else 0.0


def T(*shape):
    return torch.randn(*shape)


# --- PyTorch test/test_flop_counter.py (2 FLOPs per multiply-accumulate) -------------------------------------

PYTORCH = [
    # (case, function of the inputs, inputs, expected FLOPs)
    ("test_op mm", lambda m, a, b: torch.mm(a, b), (T(4, 5), T(5, 6)), 240),
    ("test_op bmm", lambda m, a, b: torch.bmm(a, b), (T(3, 4, 5), T(3, 5, 6)), 720),
    (
        "test_op addmm x3",
        lambda m, a, b: torch.addmm(T(4, 6), a, b) + torch.addmm(T(4, 1), a, b) + torch.addmm(T(6), a, b),
        (T(4, 5), T(5, 6)),
        720,
    ),
    ("test_op baddbmm", lambda m, a, b: torch.baddbmm(T(3, 4, 6), a, b), (T(3, 4, 5), T(3, 5, 6)), 720),
    ("test_op conv2d", lambda m, x, w: torch.conv2d(x, w, padding=1), (T(2, 3, 6, 6), T(6, 3, 4, 4)), 28800),
    ("test_op conv1d", lambda m, x, w: torch.conv1d(x, w, padding=1), (T(2, 3, 6), T(6, 3, 4)), 1440),
    ("test_convs conv_transpose2d", lambda m, x, w: F.conv_transpose2d(x, w), (T(1, 1, 2, 2), T(1, 1, 2, 2)), 32),
    ("test_convs conv2d 1x1", lambda m, x, w: F.conv2d(x, w), (T(1, 1, 2, 2), T(1, 1, 1, 1)), 8),
    ("test_addmm_out", lambda m, x: torch.mm(x, x, out=torch.zeros(10, 10)), (T(10, 10),), 2000),
]


@pytest.mark.parametrize(("case", "fn", "inputs", "flops"), PYTORCH, ids=[c[0] for c in PYTORCH])
def test_pytorch_flop_counter_cases(case, fn, inputs, flops):
    assert dot_mults(Fn(fn), *inputs) == flops / 2


def test_pytorch_flop_counter_variety():
    # mm, addmm with beta = alpha = 0.5, matmul, einsum and a Linear(9, 10): 3012 FLOPs together
    def forward(m, x):
        torch.mm(T(4, 5), T(5, 6))
        torch.addmm(T(4, 6), T(4, 5), T(5, 6), beta=0.5, alpha=0.5)
        torch.matmul(T(5, 6), T(6, 7))
        torch.einsum("ab,bc->ac", T(6, 7), T(7, 8))
        return m[0](x)

    assert dot_mults(Fn(forward, nn.Linear(9, 10)), T(8, 9)) == 3012 / 2


def test_pytorch_conv_transpose_loop():
    # ConvTranspose2d(4, 8, (2, 2), stride=2) on (1, 4, 30, 2), 50 forwards and backwards: 1536000 FLOPs. The
    # input needs no gradient, so each backward computes the weight gradient only, as many FLOPs as the forward.
    model = nn.ConvTranspose2d(4, 8, (2, 2), stride=2)
    assert dot_mults(model, torch.rand(1, 4, 30, 2)) == 1536000 / 50 / 2 / 2


def test_pytorch_pytrees_two_mm():
    # Mod: two Foo (relu_, then mm of a 10x10 by itself), forward and backward: 12000 FLOPs of mm, of which the
    # backward is twice the forward (both operands need gradients)
    foo = Fn(lambda m, x: torch.mm(x.relu_(), x))
    assert dot_mults(Fn(lambda m, x: m[1](m[0](x)), foo, foo), T(10, 10)) == 12000 / 3 / 2


@pytest.mark.parametrize(("seq_k", "flops"), [(128, 134217728), (256, 268435456)])
def test_pytorch_sdpa_causal_forward(seq_k, flops):
    # batch 4, 8 heads, 128 queries, head dim 64, is_causal=True: the forward FLOPs of every backend; the causal
    # mask does not shorten the counted products (the rule set's causal-mask policy agrees)
    q, k = torch.randn(4, 8, 128, 64), torch.randn(4, 8, seq_k, 64)
    fn = Fn(lambda m, q, k: F.scaled_dot_product_attention(q, k, k, is_causal=True))
    assert dot_mults(fn, q, k, shape_only=True) == flops / 2


def test_pytorch_scaled_mm_fp8():
    a = torch.randn(3 * 16, 5 * 16).to(torch.float8_e4m3fn)
    b = torch.randn(7 * 16, 5 * 16).to(torch.float8_e4m3fn).t()
    fn = Fn(lambda m, a, b: torch._scaled_mm(a, b, scale_a=torch.ones(()), scale_b=torch.ones(()),
                                             out_dtype=torch.bfloat16))
    assert dot_mults(fn, a, b) == 860160 / 2


# --- fvcore tests/test_flop_count.py (1 FLOP per multiply-accumulate) --------------------------------------------


@pytest.mark.parametrize(
    ("shape", "features", "macs"),
    [((5, 8), 4, 5 * 8 * 4), ((5, 10), 20, 5 * 10 * 20), ((5, 5, 10), 20, 5 * 10 * 5 * 20)],
    ids=["test_nn", "test_linear", "test_linear_3d"],
)
def test_fvcore_linear(shape, features, macs):
    assert dot_mults(nn.Linear(shape[-1], features), torch.randn(*shape)) == macs


CONVS = [
    # (dims, batch, cin, cout, spatial, kernel, padding, stride, groups, transposed, output_padding, MACs): fvcore's
    # expected value is batch * cin * cout * kernel^dims * out_spatial^dims / groups, out_spatial the input's for
    # transposed convolutions; evaluated here for its cases
    (2, 5, 10, 3, 15, 3, 1, 1, 1, False, 0, 303750),
    (2, 2, 10, 6, 20, 3, 1, 2, 1, False, 0, 108000),
    (2, 5, 16, 8, 15, 5, 2, 1, 4, False, 0, 900000),
    (2, 5, 16, 8, 15, 3, 1, 1, 8, False, 0, 162000),
    (1, 5, 10, 3, 15, 3, 1, 1, 1, False, 0, 6750),
    (3, 5, 10, 3, 15, 3, 1, 1, 1, False, 0, 13668750),
    (2, 5, 10, 3, 15, 3, 1, 1, 1, True, 0, 303750),
    (2, 5, 10, 3, 15, 3, 1, 2, 1, True, 0, 303750),
    (2, 5, 10, 3, 15, 3, 1, 3, 1, True, 2, 303750),
]


@pytest.mark.parametrize("case", CONVS, ids=["2d", "strided", "grouped", "depthwise", "1d", "3d", "transposed",
                                             "transposed_strided", "transposed_output_padding"])
def test_fvcore_conv(case):
    dims, batch, cin, cout, spatial, kernel, padding, stride, groups, transposed, output_padding, macs = case
    if transposed:
        layer = [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d][dims - 1](
            cin, cout, kernel, stride, padding, groups=groups, output_padding=output_padding
        )
    else:
        layer = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dims - 1](cin, cout, kernel, stride, padding, groups=groups)
    x = torch.randn(batch, cin, *([spatial] * dims))
    assert dot_mults(layer, x, shape_only=True) == macs


@pytest.mark.parametrize(
    ("x", "y", "macs"),
    [
        ((20, 10), (10, 100), 20000),
        ((1, 20, 10), (1, 10, 100), 20000),
        ((2, 2, 20, 10), (2, 2, 10, 100), 80000),
        ((1, 20, 10), (10, 100), 20000),
        ((2, 20, 10), (10, 100), 40000),
        ((3, 4), (4, 5), 60),
    ],
    ids=["matmul", "broadcast_1", "broadcast_2x2", "broadcast_rhs_2d", "broadcast_batch_2", "torch_mm"],
)
def test_fvcore_matmul(x, y, macs):
    assert dot_mults(Fn(lambda m, a, b: torch.matmul(a, b)), torch.randn(*x), torch.randn(*y)) == macs


def test_fvcore_bmm():
    assert dot_mults(Fn(lambda m, a, b: torch.bmm(a, b)), torch.randn(2, 5, 2), torch.randn(2, 2, 12)) == 240


@pytest.mark.parametrize(
    ("equation", "x", "y", "macs"),
    [
        ("nct,ncp->ntp", (1, 5, 2), (1, 5, 12), 120),
        ("ntg,ncg->nct", (1, 2, 6), (1, 5, 6), 60),
        ("nc,nchw->hw", (3, 4), (3, 4, 2, 3), 72),
    ],
)
def test_fvcore_einsum(equation, x, y, macs):
    fn = Fn(lambda m, a, b: torch.einsum(equation, a, b))
    assert dot_mults(fn, torch.randn(*x), torch.randn(*y)) == macs


def test_fvcore_batch_norm_inference_is_one_multiply_per_element():
    # fvcore: BatchNorm1d(10, affine=False) in eval on (10, 10) costs 1 per element
    report = ms.count(nn.BatchNorm1d(10, affine=False).eval(), torch.randn(10, 10), samples=1)
    assert report.mults == 100


class ThreeNet(nn.Module):
    """fvcore's ThreeNet: 1x1 conv, adaptive average pool to 1x1, two linear layers."""

    def __init__(self, input_dim: int, conv_dim: int, linear_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(input_dim, conv_dim, 1, 1)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear1 = nn.Linear(conv_dim, linear_dim)
        self.linear2 = nn.Linear(linear_dim, 1)

    def forward(self, x):
        return self.linear2(self.linear1(torch.flatten(self.pool(self.conv(x)), 1)))


def test_fvcore_three_net_by_module():
    # fvcore by_module: conv 4000, linear1 60, linear2 12, pool 2000 (one per input element)
    report = ms.count(ThreeNet(2, 5, 3).eval(), torch.randn(4, 2, 10, 10), samples=1)
    assert not report.uncounted
    dots = {name: report.layer(name).mults for name in ("conv", "linear1", "linear2")}
    assert dots == {"conv": 4000, "linear1": 60, "linear2": 12}
    pool = report.layer("pool")
    assert pool.mults + pool.adds == 2000  # n - 1 adds and 1 division per window: n per window
