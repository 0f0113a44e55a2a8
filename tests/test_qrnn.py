"""JAIST's QRNN language model: key layout, parameter counts, the recurrence, the split softmax, loading."""

from __future__ import annotations

import pytest
import torch
from micronet_score.models import qrnn
from micronet_score.models.registry import get
from torch.nn import functional as F

from micronet_score.errors import MicronetError

SMALL = {"vocabulary": 60, "emsize": 6, "nhid": 10, "nlayers": 3, "splits": [10, 25, 40]}


def make_checkpoint(config=SMALL, seed=0) -> dict[str, torch.Tensor]:
    """A state dict in awd-lstm's key layout, written out by hand from the spec (A.5), random values."""
    gen = torch.Generator().manual_seed(seed)
    v, e, h, n = (config[k] for k in ("vocabulary", "emsize", "nhid", "nlayers"))
    widths = [e] + [h] * (n - 1) + [e]
    sd = {"encoder.weight": torch.randn(v, e, generator=gen)}
    for i in range(n):
        window = 2 if i == 0 else 1
        sd[f"rnns.{i}.linear.module.weight_raw"] = torch.randn(3 * widths[i + 1], window * widths[i], generator=gen)
        sd[f"rnns.{i}.linear.module.bias"] = torch.randn(3 * widths[i + 1], generator=gen)
    sd["decoder.weight"] = sd["encoder.weight"]
    sd["decoder.bias"] = torch.randn(v, generator=gen)
    criterion = {"tail_vectors": torch.randn(len(config["splits"]), e, generator=gen),
                 "tail_bias": torch.randn(len(config["splits"]), generator=gen)}
    return {"model": sd, "criterion": criterion}


def reference_log_probs(ckpt, tokens: list[int], splits) -> torch.Tensor:
    """The model's equations evaluated one token at a time, straight from the state dict (batch 1)."""
    sd, crit = ckpt["model"], ckpt["criterion"]
    n = sum(1 for k in sd if k.endswith("weight_raw"))
    cells = [None] * n
    prev = [None] * n
    out = []
    for token in tokens:
        x = sd["encoder.weight"][token]
        for i in range(n):
            w, b = sd[f"rnns.{i}.linear.module.weight_raw"], sd[f"rnns.{i}.linear.module.bias"]
            hidden = w.shape[0] // 3
            if cells[i] is None:
                cells[i] = torch.zeros(hidden)
                prev[i] = torch.zeros_like(x)
            source = torch.cat([x, prev[i]]) if i == 0 else x
            prev[i] = x
            y = w @ source + b
            z, f, o = torch.tanh(y[:hidden]), torch.sigmoid(y[hidden:2 * hidden]), torch.sigmoid(y[2 * hidden:])
            cells[i] = f * z + (1 - f) * cells[i]
            x = o * cells[i]
        weight, bias = sd["encoder.weight"], sd["decoder.bias"]
        logits = weight @ x + bias
        bounds = [0, *splits, weight.shape[0]]
        head = F.log_softmax(torch.cat([logits[: splits[0]], crit["tail_vectors"] @ x + crit["tail_bias"]]), 0)
        word = torch.empty(weight.shape[0])
        word[: splits[0]] = head[: splits[0]]
        for k in range(1, len(bounds) - 1):
            tombstone = head[splits[0] + len(splits) - k]  # column -k of the head
            word[bounds[k]:bounds[k + 1]] = tombstone + F.log_softmax(logits[bounds[k]:bounds[k + 1]], 0)
        out.append(word)
    return torch.stack(out)


def test_parameter_count_of_the_jaist_configuration_on_meta():
    spec = get("jaist-qrnn")
    assert spec.track == "wikitext103"
    with torch.device("meta"):
        model = spec.build(spec.default_config)
    criterion = sum(p.numel() for p in model.criterion.parameters())
    total = sum(p.numel() for p in model.parameters())  # the tied matrix once
    assert criterion == 903  # 3 x 300 + 3
    assert total - criterion == 104_905_335  # A.6, "excluding 903"
    assert total == 104_906_238  # main.py's printout


def test_key_layout_and_shapes_match_awd_lstm():
    with torch.device("meta"):
        model = qrnn.build(qrnn.DEFAULT_CONFIG)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "encoder.weight": (267735, 300),
        "rnns.0.linear.module.weight_raw": (5400, 600), "rnns.0.linear.module.bias": (5400,),
        "rnns.1.linear.module.weight_raw": (5400, 1800), "rnns.1.linear.module.bias": (5400,),
        "rnns.2.linear.module.weight_raw": (5400, 1800), "rnns.2.linear.module.bias": (5400,),
        "rnns.3.linear.module.weight_raw": (900, 1800), "rnns.3.linear.module.bias": (900,),
        "decoder.weight": (267735, 300), "decoder.bias": (267735,),
        "criterion.tail_vectors": (3, 300), "criterion.tail_bias": (3,),
    }
    assert model.decoder.weight is model.encoder.weight


def test_config_is_inferred_from_the_real_shapes_on_meta():
    with torch.device("meta"):
        model = qrnn.build(qrnn.DEFAULT_CONFIG)
    config = get("qrnn").config_from_state_dict(model.state_dict())
    assert config == qrnn.DEFAULT_CONFIG
    loaded = qrnn.load_qrnn(model.state_dict())
    assert sum(p.numel() for p in loaded.parameters()) == 104_906_238


def test_forward_matches_the_equations_and_is_a_full_distribution():
    ckpt = make_checkpoint()
    model = qrnn.load_qrnn(ckpt, splits=SMALL["splits"])
    tokens = [3, 17, 59, 30, 0, 44]
    with torch.no_grad():
        log_probs, _ = model(torch.tensor(tokens).view(-1, 1))
    assert log_probs.shape == (6, 1, 60)
    expected = reference_log_probs(ckpt, tokens, SMALL["splits"])
    torch.testing.assert_close(log_probs[:, 0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_probs.logsumexp(-1), torch.zeros(6, 1), rtol=0, atol=1e-5)


def test_state_carries_cells_and_previous_input_across_calls():
    model = qrnn.load_qrnn(make_checkpoint(seed=1), splits=SMALL["splits"])
    tokens = torch.tensor([5, 9, 41, 2, 33]).view(-1, 1)
    with torch.no_grad():
        whole, _ = model(tokens)
        state = None
        pieces = []
        for t in range(5):  # online: one token per call, batch 1
            out, state = model(tokens[t:t + 1], state)
            pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces), whole)
    assert state[0].prev_x.shape == (1, 6)  # the first layer's x_{t-1}


def test_streaming_score_in_segments_equals_one_pass():
    """The evaluator's interface: score(tokens, targets, state) in segments gives the one-pass log-likelihood."""
    model = qrnn.load_qrnn(make_checkpoint(seed=2), splits=SMALL["splits"])
    ids = torch.tensor([[4, 7], [58, 12], [11, 39], [26, 0], [3, 3], [40, 21], [9, 55]])  # (T + 1, B = 2)
    tokens, targets = ids[:-1], ids[1:]
    with torch.no_grad():
        full, _ = model(tokens)
        whole, _ = model.score(tokens, targets)
        state = model.init_state(batch=2)
        pieces = []
        for start in (0, 2, 5):
            stop = {0: 2, 2: 5, 5: 6}[start]
            logp, state = model.score(tokens[start:stop], targets[start:stop], state)
            pieces.append(logp)
    assert whole.shape == (6, 2)
    torch.testing.assert_close(whole, full.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(torch.cat(pieces), whole)
    assert [tuple(s.cell.shape) for s in state] == [(2, 10), (2, 10), (2, 6)]
    with pytest.raises(MicronetError, match="targets"):
        model.score(tokens, targets[:3])


def test_flat_format_with_criterion_prefix_loads_the_same():
    ckpt = make_checkpoint(seed=2)
    flat = dict(ckpt["model"])
    del flat["decoder.weight"]  # optional: tied
    flat.update({f"criterion.{k}": v for k, v in ckpt["criterion"].items()})
    a = qrnn.load_qrnn(ckpt, splits=SMALL["splits"])
    b = qrnn.load_qrnn(flat, splits=SMALL["splits"])
    x = torch.tensor([[1], [50]])
    with torch.no_grad():
        torch.testing.assert_close(a(x)[0], b(x)[0])
    assert b.decoder.weight is b.encoder.weight


def test_bad_checkpoints_list_every_problem_in_one_message():
    ckpt = make_checkpoint()
    ckpt["model"]["rnns.1.linear.module.bias"] = torch.zeros(7)
    del ckpt["model"]["decoder.bias"]
    ckpt["model"]["extra.weight"] = torch.zeros(1)
    with pytest.raises(MicronetError) as err:
        qrnn.load_qrnn(ckpt, splits=SMALL["splits"])
    message = str(err.value)
    assert "1 missing: decoder.bias [" in message
    assert "1 misshapen: rnns.1.linear.module.bias [7] (expected [30])" in message
    assert "1 unexpected: extra.weight" in message


def test_untied_decoder_and_unknown_splits_are_refused():
    ckpt = make_checkpoint()
    ckpt["model"]["decoder.weight"] = ckpt["model"]["decoder.weight"] + 1
    with pytest.raises(MicronetError, match="ties them"):
        qrnn.load_qrnn(ckpt, splits=SMALL["splits"])
    with pytest.raises(MicronetError, match="give the splits explicitly"):
        qrnn.load_qrnn(make_checkpoint())  # V=60 has no awd-lstm splits, but 3 tail clusters
    with pytest.raises(MicronetError, match="not a QRNN"):
        qrnn.load_qrnn({"weight": torch.zeros(2)})
