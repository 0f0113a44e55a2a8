"""The JAIST QRNN's per-token operation census (seed-systems spec A.7), counted by the interpreter.

Hand derivation, per token and per layer (window w, input width I, hidden width H):

* the fused affine map: a dot product of length w*I for each of the 3H gate values: w*I*3H mults,
  (w*I - 1)*3H adds, plus 3H bias adds (spec A.7: L0 3,240,000; L1, L2 9,720,000; L3 1,620,000 mults);
* the elementwise work: f*z, (1-f)*c, o*c: 3H mults; 1-f and the + of the recurrence: 2H adds;
* tanh on Z: H evaluations; sigmoid on F and O: 2H evaluations, priced by the rule set (micronet-2019:
  tanh 1 "other", sigmoid 2 mults + 1 add per element).

The split softmax over the full distribution (every cluster, as a perplexity evaluation needs): dot products of
length 300 for the V words and the 3 tombstones, (V+3)*300 mults and (V+3)*299 adds, V+3 bias adds; log-softmax
over the head's 2,803 logits and over each of the 3 clusters (4 rows, V+3 elements); one add per tail word to put
the tombstone's log-probability in front of its cluster's (V - 2,800 adds). The embedding lookup is free.

Zero state: our layers start from zero tensors made by ``new_zeros`` (free), so unlike the authors' torchqrnn
(spec A.7: one extra 300-element multiply per segment, x_{-1} built by multiplying by zero) nothing is added per
segment and every token costs the same. The recurrence of the first step still multiplies (1-f) by the zero cell,
which is counted as it is for every other step.
"""

from __future__ import annotations

import pytest
import torch
from micronet_score.models import qrnn

import micronet_score as ms
from micronet_score.ruleset import load_rules

V = 267_735
LAYERS = [(0, 2, 300, 1800), (1, 1, 1800, 1800), (2, 1, 1800, 1800), (3, 1, 1800, 300)]  # (index, w, I, H)
TOKENS = 5


def price(family: str) -> tuple[float, float, float]:
    cost = load_rules("micronet-2019").ops[family].per_element
    return cost.mults, cost.adds, cost.others


@pytest.fixture(scope="module")
def report(meta_count):
    return meta_count("jaist-qrnn", torch.zeros(TOKENS, 1, dtype=torch.long))


def test_parameters_and_storage(report):
    assert report.samples == TOKENS and report.per == "token"
    assert report.params == 104_905_335 + 903  # A.6: the model, plus the split softmax's tombstones
    assert report.layer("encoder").storage == 300 * V  # tied with the decoder: stored once
    assert report.layer("decoder").storage == V  # its bias


@pytest.mark.parametrize(("index", "window", "width_in", "hidden"), LAYERS)
def test_per_layer_census(report, index, window, width_in, hidden):
    macs = window * width_in * 3 * hidden
    assert macs == {0: 3_240_000, 1: 9_720_000, 2: 9_720_000, 3: 1_620_000}[index]  # A.7 table
    linear = report.layer(f"rnns.{index}.linear.module")
    assert linear.mults == macs
    assert linear.adds == (window * width_in - 1) * 3 * hidden + 3 * hidden
    assert linear.storage == macs + 3 * hidden
    sig_m, sig_a, sig_o = price("sigmoid")
    tanh_m, tanh_a, tanh_o = price("tanh")
    assert (sig_m, sig_a, sig_o, tanh_m, tanh_a, tanh_o) == (2, 1, 0, 0, 0, 1)
    layer = report.layer(f"rnns.{index}")  # the gates and the recurrence, outside the linear map
    assert layer.mults == 3 * hidden + 2 * hidden * sig_m + hidden * tanh_m
    assert layer.adds == 2 * hidden + 2 * hidden * sig_a + hidden * tanh_a
    assert layer.others == 2 * hidden * sig_o + hidden * tanh_o


def test_elementwise_families_over_all_layers(report):
    widths = 1800 * 3 + 300  # sum of H: 5,700 (A.7)
    assert report.family("tanh").others == widths
    assert report.family("sigmoid").mults == 2 * 2 * widths
    assert report.family("mul").mults == 3 * widths  # f*z, (1-f)*c, o*c
    assert report.family("sub").adds == widths  # 1 - f


def test_split_softmax_over_the_full_distribution(report):
    root = report.layer("")  # log_probs runs F.linear on the tied weight inside the model's own forward
    assert root.mults == (V + 3) * 300 == 80_321_400  # A.7: full distribution
    ls_m, ls_a, ls_o = price("log_softmax")
    rows, elements = 4, V + 3
    log_softmax_adds = elements * ls_a - rows  # per row of n: 2n - 1 adds, n exp and 1 log
    assert root.adds == (V + 3) * 299 + (V + 3) + log_softmax_adds + (V - 2800)
    assert root.others == elements * ls_o + rows
    linears = sum(window * width_in * 3 * hidden for _, window, width_in, hidden in LAYERS)
    assert report.family("dot_product").mults == linears + (V + 3) * 300 == 104_621_400
    assert report.family("bias").adds == 3 * 5700 + (V + 3)


def test_meta_and_real_forward_agree_and_per_token_cost_is_constant():
    """A small QRNN with real weights: the same counts as on meta, the same per token for any length."""
    config = {"vocabulary": 60, "emsize": 8, "nhid": 12, "nlayers": 3, "splits": [10, 30]}
    torch.manual_seed(0)
    real = qrnn.build(config).eval()
    for p in real.parameters():
        torch.nn.init.normal_(p)
    with torch.device("meta"):
        meta = qrnn.build(config).eval()
    totals = set()
    for steps in (1, 3, 7):
        tokens = torch.randint(0, 60, (steps, 1))
        with torch.no_grad():
            a = ms.count(real, tokens)
        b = ms.count(meta, tokens.to("meta"))
        assert (a.mults, a.adds, a.others) == (b.mults, b.adds, b.others)
        totals.add((a.mults, a.adds, a.others))
    assert len(totals) == 1
