"""The MIT LM's fused head (plain evaluation) against the full distribution written out directly, and against the
reference path that counting runs: the same log-probabilities, and the counts of the reference path.

The reference here is the definition: every bin's logits in full, log_softmax of [bin 0 ‖ clusters] and of each
tail, in float64, the target's log-prob picked by hand.
"""

import pytest
import torch
from micronet_score.models.mit_lm import MitLM, MitLMConfig, example_tokens, tail_log_prob

from micronet_score import Counter

HEAD = dict(n_layers=1, n_embed=32, n_embeds=[32, 16, 4], cutoffs=[300, 1000], n_vocab=7001, n_head=2, n_k=4,
            n_v=4, n_inner=24, n_seq=5, use_cache=False, bits=9)


def full_distribution_log_prob(head, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) from the whole distribution, in float64, by the adaptive-softmax definition."""
    h = h.double()
    edges = head.edges
    first = torch.cat([h @ head.layers[0].weight.double().t() + head.layers[0].bias.double(),
                       h @ head.clusters.weight.double().t() + head.clusters.bias.double()], -1)
    first_lp = torch.log_softmax(first, -1)
    out = []
    for r, t in enumerate(targets.tolist()):
        if t < edges[1]:
            out.append(first_lp[r, t])
            continue
        i = next(i for i in range(1, len(edges) - 1) if edges[i] <= t < edges[i + 1])
        x = h[r] @ head.projections[i - 1].weight.double().t()
        tail = x @ head.layers[i].weight.double().t() + head.layers[i].bias.double()
        out.append(first_lp[r, -i] + torch.log_softmax(tail, -1)[t - edges[i]])
    return torch.stack(out)


def head_model(scale: float = 0.3, seed: int = 0) -> MitLM:
    torch.manual_seed(seed)
    model = MitLM(MitLMConfig.from_mapping(HEAD))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, scale)
    return model.eval()


@pytest.mark.parametrize("scale", [0.3, 6.0], ids=["ordinary logits", "logits in the hundreds"])
def test_fused_head_equals_the_full_distribution(scale):
    model = head_model(scale)
    head = model.loss
    head.fused_rows, head.fused_columns = 7, 97  # blocks that divide nothing: partial row and column blocks
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(40, 32, generator=gen)
    targets = example_tokens(model.config, 40, seed=2)
    assert all(((targets >= lo) & (targets < hi)).any() for lo, hi in zip(head.edges, head.edges[1:]))
    with torch.no_grad():
        fused = head(h, targets)
        reference = head._log_prob_block(h, targets, None)  # the path that counting takes
    expected = full_distribution_log_prob(head, h, targets)
    assert torch.isfinite(fused).all()
    assert torch.allclose(fused.double(), expected, rtol=1e-5, atol=1e-4 if scale > 1 else 1e-5)
    assert torch.allclose(fused, reference, rtol=1e-5, atol=1e-4 if scale > 1 else 1e-5)


@pytest.mark.parametrize("bins", [(0,), (1,), (2,), (0, 2)], ids=["head only", "bin 1 only", "bin 2 only", "no bin 1"])
def test_fused_head_when_some_bins_hold_no_target(bins):
    """The fused head normalises a tail bin only for the tokens whose target lies in it: bins without targets
    are skipped, and the others' tokens still get the full distribution's log-probabilities."""
    model = head_model()
    head = model.loss
    head.fused_rows, head.fused_columns = 5, 97
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(23, 32, generator=gen)
    choices = [torch.randint(head.edges[b], head.edges[b + 1], (23,), generator=gen) for b in bins]
    pick = torch.randint(0, len(bins), (23,), generator=gen)
    targets = torch.stack(choices, 1).gather(1, pick.unsqueeze(1)).squeeze(1)
    with torch.no_grad():
        fused = head(h, targets)
    expected = full_distribution_log_prob(head, h, targets)
    assert torch.allclose(fused.double(), expected, rtol=1e-5, atol=1e-5)


def test_tail_normaliser_shift_bound_and_its_exact_fallback():
    """Narrow tails are shifted by a bound on their logits; where that bound lies far above a row's real maximum
    (the sum of exponentials would underflow), the row is recomputed exactly. Both against log_softmax."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(5000, 4, generator=gen, dtype=torch.float64)
    weight[:, 0] = weight[:, 0].abs() * 40  # every row's first feature large and positive
    bias = torch.randn(5000, generator=gen, dtype=torch.float64)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64) * 3
    x[0] = torch.tensor([-5.0, 0.1, 0.1, 0.1])  # logits all near −200·: the bound (≈ +200) is 400 too high
    x[1] = torch.tensor([5.0, 0.1, 0.1, 0.1])  # logits near +200·: exp without a shift would overflow in fp32
    index = torch.tensor([0, 17, 4999, 2500, 3, 1234])
    expected = torch.log_softmax(x @ weight.t() + bias, -1).gather(1, index.unsqueeze(1)).squeeze(1)
    for columns in (64, 777, 5000):
        got = tail_log_prob(x, weight, bias, index, columns)
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-9)
        got32 = tail_log_prob(x.float(), weight.float(), bias.float(), index, columns)
        assert torch.isfinite(got32).all() and torch.allclose(got32.double(), expected, rtol=1e-5, atol=2e-3)
    wide = torch.randn(300, 40, generator=gen)  # a wide tail: the exact running maximum
    xw = torch.randn(3, 40, generator=gen) * 4
    expected = torch.log_softmax(xw @ wide.t(), -1)[:, [5, 6, 299]].diagonal()
    assert torch.allclose(tail_log_prob(xw, wide, None, torch.tensor([5, 6, 299]), 64), expected, atol=1e-5)


def test_counting_runs_the_reference_path_with_the_same_values():
    """Under the Counter (a dispatch mode) the head takes the reference path, whose log-softmax of every bin is
    what the rules price: three log-softmax calls per block of rows; the values equal the fused path's."""
    model = head_model()
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(12, 32, generator=gen)
    targets = example_tokens(model.config, 12, seed=5)
    counter = Counter(model.loss, track="wikitext103")
    with torch.no_grad():
        fused = model.loss(h, targets)
        with counter.measure(samples=12):
            counted = model.loss(h, targets)
    report = counter.report()
    assert report.family("log_softmax").calls == 3
    assert report.family("log_softmax").adds == sum(2 * n - 1 for n in (302, 700, 6001))
    assert torch.allclose(fused, counted, rtol=1e-5, atol=1e-6)
