"""The MIT LM's fused tail normalisers (models/mit_lm.py tail_log_prob) at their edges, against log_softmax
written out in float64."""

import torch
from micronet_score.models import mit_lm


def test_wide_tail_whose_later_logits_overflow_the_first_block_shift_is_recomputed_exactly(monkeypatch):
    """A wide tail is shifted by the largest logit of its first column block; a logit ~200 above it (e^200
    overflows float32) makes the row's sum infinite, and the row is recomputed with the exact running maximum.
    Against log_softmax in float64."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(500, 40, generator=gen) * 0.1
    weight[450:, 0] = 50.0  # columns 450.. of the last block: logit 50·x_0 for a row with x_0 = 4
    bias = torch.randn(500, generator=gen) * 0.1
    x = torch.randn(3, 40, generator=gen) * 0.1
    x[0, 0] = 4.0
    index = torch.tensor([460, 3, 499])
    expected = torch.log_softmax(x.double() @ weight.double().t() + bias.double(), -1)
    expected = expected.gather(1, index.unsqueeze(1)).squeeze(1)
    exact = []
    online = mit_lm._online_log_sum_exp
    monkeypatch.setattr(mit_lm, "_online_log_sum_exp", lambda x, *a: exact.append(len(x)) or online(x, *a))
    got = mit_lm.tail_log_prob(x, weight, bias, index, 64)
    assert exact == [1]  # row 0 only
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-4)
