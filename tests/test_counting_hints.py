"""Pricing hints (micronet_score.counting.hints): a fast computation runs, its reference computation is priced.

References: the same computation counted through its reference path (a second counting method: the reference
runs on real tensors there, on meta stand-ins here), and hand-derived op counts of the reference.
"""

import pytest
import torch
from micronet_score.models.mit_lm import AdaptiveSoftmax, MitLM, MitLMConfig, example_tokens
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from micronet_score import Counter, count
from micronet_score.errors import CountingBug
from micronet_score.evaluate_lm import evaluate_stream
from micronet_score.hints import priced_as, priced_by_shapes

SMALL = dict(n_layers=2, n_embed=16, n_embeds=[16, 8, 4], cutoffs=[20, 50], n_vocab=100, n_head=2, n_k=4, n_v=4,
             n_inner=24, n_seq=5, n_cache=12, cache_theta=0.3, cache_lambda=0.2, bits=9)


class Quantize(nn.Module):
    """Rounds to a 1/8 grid and declares 6-bit outputs (a mark the hinted reference must see)."""

    output_bits = 6

    def forward(self, x):
        return torch.round(x * 8) / 8


class Hinted(nn.Module):
    """log_softmax(W x + b) picked at the targets: fast by an op the rule set does not price (logcumsumexp, so a
    priced fast path would show up as uncounted), priced as the plain linear + log_softmax + gather."""

    def __init__(self, hinted: bool = True):
        super().__init__()
        self.quant = Quantize()
        self.linear = nn.Linear(8, 5)
        self.hinted = hinted

    def forward(self, x, targets):
        a = self.quant(x)
        if self.hinted:
            return priced_as(self.fast, self.reference, a, targets)
        return self.reference(a, targets)

    def fast(self, a, targets):
        logits = a @ self.linear.weight.t() + self.linear.bias
        normaliser = torch.logcumsumexp(logits, dim=1)[:, -1]
        return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - normaliser

    def reference(self, a, targets):
        return torch.log_softmax(self.linear(a), dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(3, 8, generator=gen), torch.tensor([0, 4, 2])


def test_hint_runs_the_fast_computation_and_prices_the_reference_with_widths():
    x, t = _inputs()
    weight_bits = {"linear.weight": 4, "linear.bias": 4}
    hinted = count(Hinted(), x, t, samples=3, weight_bits=weight_bits)
    plain = count(Hinted(hinted=False), x, t, samples=3, weight_bits=weight_bits)
    assert hinted.uncounted == []  # the fast path's logcumsumexp was not priced
    assert hinted.model_dump() == plain.model_dump()
    # by hand, per row: the linear 8·5 mults, 7·5 + 5 adds (the bias); the mults at the wider of the 4-bit
    # weight and the 6-bit marked input (both seen through their meta stand-ins: either missed would be 32 bits),
    # the adds at the 32-bit accumulator; the log-softmax over 5: 2·5 − 1 adds, 5 exps + 1 log
    row = hinted.layer("linear")
    assert (row.mults, row.adds, row.flops) == (40, 40, 40 * 6 / 32 + 40)
    assert (hinted.layer("").adds, hinted.layer("").others) == (9, 6)
    model = Hinted()
    with torch.no_grad():
        fast = model(x, t)
        model.hinted = False
        assert torch.allclose(fast, model(x, t))


def test_hint_outside_a_counter_runs_fast_and_under_other_modes_or_meta_the_reference():
    model, (x, t) = Hinted(), _inputs()
    ran = []
    model.fast = lambda a, b: ran.append("fast") or Hinted.fast(model, a, b)
    with torch.no_grad():
        model(x, t)
        assert ran == ["fast"]
        with FlopCounterMode(display=False) as flops:
            model(x, t)
        assert ran == ["fast"] and flops.get_total_flops() == 2 * 3 * 8 * 5  # the reference's linear
        out = model.to("meta")(x.to("meta"), t.to("meta"))
    assert ran == ["fast"] and out.is_meta and out.shape == (3,)


def test_hint_whose_fast_and_reference_shapes_differ_is_an_internal_error():
    class Wrong(Hinted):
        def fast(self, a, targets):
            return super().fast(a, targets)[:2]

    with pytest.raises(CountingBug, match="pricing hint"):
        count(Wrong(), *_inputs(), samples=1)


def _counted_eval(model: MitLM, tokens: torch.Tensor, fused: bool):
    for part in (model.loss, model.loss.cache, *model.layers):  # the fast paths, or their references op by op
        part.fused = fused
    counter = Counter(model, track="wikitext103", bits=model.config.bits)
    result = evaluate_stream(model, tokens, chunk=20, counter=counter, progress=False)
    return result, counter.report()


def test_mit_counted_evaluation_through_the_fast_paths_counts_as_their_references_op_by_op(monkeypatch):
    torch.manual_seed(0)
    model = MitLM(MitLMConfig.from_mapping(SMALL)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        for name, buf in model.named_buffers():
            buf.fill_(4.0 if name.endswith("max_abs") else 4.0 / 255)
    model.loss.block_elements = 7 * 50  # several reference blocks of 7 rows per chunk, one ragged
    model.loss.fused_rows = 8
    tokens = example_tokens(model.config, 61, seed=3)
    where = []
    block = AdaptiveSoftmax._log_prob_block
    monkeypatch.setattr(AdaptiveSoftmax, "_log_prob_block",
                        lambda self, h, *a: where.append(h.device.type) or block(self, h, *a))
    fast, fast_report = _counted_eval(model, tokens, fused=True)
    assert where and set(where) == {"meta"}  # priced on stand-ins; the values came from the fused head
    where.clear()
    reference, reference_report = _counted_eval(model, tokens, fused=False)
    assert where and set(where) == {"cpu"}
    # every count equal; only the number of op calls differs: on meta the priced reference head takes all rows in
    # one block (no memory to bound) where the real one takes blocks of 7, and the layers and the cache are priced
    # once per shape (the third chunk of 20 adds the second's count; the first has empty memory and cache)
    fast_dump, reference_dump = fast_report.model_dump(), reference_report.model_dump()
    fast_calls = sum(op.pop("calls") for op in fast_dump["ops"])
    reference_calls = sum(op.pop("calls") for op in reference_dump["ops"])
    assert fast_report.uncounted == [] and fast_dump == reference_dump
    assert fast_calls < reference_calls
    assert fast.nll == pytest.approx(reference.nll, rel=1e-6)
    assert fast.perplexity == pytest.approx(reference.perplexity, rel=1e-6)



# ------------------------------------------------------------------------------ priced once per signature (memo)


class Blocks(nn.Module):
    """A block priced by its shapes (priced_by_shapes), or counted op by op on real tensors (``hinted=False``, the
    second method); ``priced`` counts the runs on meta stand-ins, that is, the times the block was priced."""

    def __init__(self, hinted: bool = True):
        super().__init__()
        self.quant = Quantize()
        self.linear = nn.Linear(8, 5)
        self.out_quant = ScaleQuantize()
        self.spare = nn.Linear(2, 3)  # never runs, its parameters read by no op: not stored
        self.hinted = hinted
        self.priced = 0

    def forward(self, x, quantize=False):
        a = self.quant(x) if quantize else x
        return priced_by_shapes(self.step, a) if self.hinted else self.step(a)

    def step(self, a):
        self.priced += a.is_meta
        return self.out_quant(torch.relu(self.linear(a)))


class ScaleQuantize(nn.Module):
    """Rounds to a grid of a stored step (a buffer read only as the quantizer's scale: stored for inference)."""

    output_bits = 8

    def __init__(self):
        super().__init__()
        self.register_buffer("step", torch.tensor(0.25))

    def forward(self, x):
        return torch.round(x / self.step) * self.step


CALLS = [(3, False), (3, False), (2, False), (3, True), (3, False), (2, False), (3, True)]
"""(rows, quantized input) of each counted call: four signatures"""


def _measure(model: nn.Module, calls=CALLS, **settings) -> Counter:
    counter = Counter(model, weight_bits={"linear.weight": 4, "linear.bias": 4}, **settings)
    gen = torch.Generator().manual_seed(0)
    for rows, quantize in calls:
        with counter.measure(samples=rows):
            model(torch.randn(rows, 8, generator=gen), quantize)
    return counter


def test_a_shape_priced_block_is_priced_once_per_signature_and_counts_as_op_by_op():
    memo, plain = Blocks(), Blocks(hinted=False)
    plain.load_state_dict(memo.state_dict())
    memo_report, plain_report = _measure(memo).report(), _measure(plain).report()
    assert memo.priced == 3  # (3, unmarked), (2, unmarked), (3, 6-bit marked): each priced on its first call only
    assert memo_report.model_dump() == plain_report.model_dump()
    # stored: the linear's 40 + 5 entries at 4 bits, the quantizer's step at 32 bits; not the spare layer's
    assert memo_report.storage == pytest.approx(45 * 4 / 32 + 1)
    # by hand, per row: 8·5 mults, 7·5 + 5 adds; the mults at the wider of the 4-bit weight and the input: 6 bits
    # for the 6 quantized rows, 32 for the 13 others; adds at the 32-bit accumulator
    row = memo_report.layer("linear")
    assert (row.mults, row.adds) == (40, 40)
    assert row.flops == pytest.approx((6 * (40 * 6 / 32 + 40) + 13 * (40 + 40)) / 19)


def test_shape_pricing_starts_over_when_the_weights_are_replaced_and_not_when_values_change():
    model = Blocks()
    counter = _measure(model, CALLS[:2])
    assert model.priced == 1
    with torch.no_grad():
        model.linear.weight[:, :4] = 0  # pruned in place: the same tensor, the same prices (density at report)
    with counter.measure(samples=3):
        model(torch.randn(3, 8))
    assert model.priced == 1
    model.linear.weight = nn.Parameter(torch.randn(5, 8))  # a new tensor: a new weight table, priced again
    with counter.measure(samples=3):
        model(torch.randn(3, 8))
    assert model.priced == 2


def test_a_closure_is_priced_every_call():
    priced = []
    scale = 2.0

    def scaled(a):  # a closure: what it captures is not part of any signature
        priced.append(a.is_meta)
        return torch.relu(a * scale)

    counter = Counter(nn.Identity())
    for _ in range(3):
        with counter.measure(samples=3):
            priced_by_shapes(scaled, torch.randn(3, 8))
    assert priced == [False, True] * 3  # run, then priced on meta, every call
    assert counter.report().flops == pytest.approx(2 * 8)  # per row: 8 mults (the scale), 8 comparisons (the ReLU)
