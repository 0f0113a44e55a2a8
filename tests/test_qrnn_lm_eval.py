"""The JAIST QRNN scored per token on a WikiText-style corpus through the CLI (issue 7).

A tiny QRNN (V from a generated corpus, awd-lstm's word ids: order of first appearance over train, valid, test) is
saved in the authors' key layout and evaluated with ``micronet-score eval``. The perplexity is checked against the
model's equations evaluated token by token straight from the state dict (tests/test_qrnn.py), the operations per
token against a count of the same tokens, and the vocabulary order against a corpus whose frequency order differs.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
import torch
from micronet_score.models import qrnn
from test_qrnn import make_checkpoint, reference_log_probs

import micronet_score as ms

SPLITS = [6, 15]
WORDS = [f"w{i:02d}" for i in range(28)]


def _corpus() -> dict[str, list[str]]:
    """Lines of words whose frequency falls with the index; the first line of train lists them in reverse, so
    first appearance is nearly the opposite of frequency. ``only_in_test`` appears in test alone."""
    rng = random.Random(7)
    weights = [1 / (i + 1) for i in range(len(WORDS))]

    def lines(n: int) -> list[str]:
        return [" ".join(rng.choices(WORDS, weights, k=rng.randint(3, 9))) for _ in range(n)]

    return {
        "train": [" ".join(reversed(WORDS)), *lines(30)],
        "valid": ["", *lines(6)],  # a blank line is one <eos>
        "test": [*lines(10), "w00 only_in_test w01", *lines(4)],
    }


def _tokens(lines: list[str]) -> list[str]:
    return [w for line in lines for w in [*line.split(), "<eos>"]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wikitext")
    text = _corpus()
    for split, lines in text.items():
        (folder / f"wiki.{split}.tokens").write_text("\n".join(lines) + "\n", encoding="utf-8")
    first: dict[str, None] = {}
    for split in ("train", "valid", "test"):
        for w in _tokens(text[split]):
            first.setdefault(w)
    counts = Counter(w for split in ("train", "valid", "test") for w in _tokens(text[split]))
    by_frequency = sorted(first, key=lambda w: -counts[w])
    return {"dir": folder, "first": list(first), "frequency": by_frequency, "test": _tokens(text["test"])}


@pytest.fixture(scope="module")
def checkpoint(corpus, tmp_path_factory):
    """The authors' layout ``{'model': sd, 'criterion': sd}``; the splits (not in the shapes) in a config file."""
    folder = tmp_path_factory.mktemp("qrnn")
    config = {"vocabulary": len(corpus["first"]), "emsize": 5, "nhid": 7, "nlayers": 3, "splits": SPLITS}
    ckpt = make_checkpoint(config, seed=3)
    torch.save(ckpt, folder / "qrnn.pt")
    (folder / "config.yaml").write_text(f"splits: {SPLITS}\nlr: 30\n")
    return {"path": folder / "qrnn.pt", "config": folder / "config.yaml", "state": ckpt}


def _reference_perplexity(state, words: list[str], vocabulary: list[str]) -> float:
    ids = [vocabulary.index(w) for w in words]
    log_probs = reference_log_probs(state, ids[:-1], SPLITS)
    nll = -sum(float(log_probs[t, ids[t + 1]]) for t in range(len(ids) - 1)) / (len(ids) - 1)
    return math.exp(nll)


def _eval(cli, *args):
    code, out, err = cli("eval", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_perplexity_equals_the_per_token_reference(cli, corpus, checkpoint):
    report = _eval(cli, str(checkpoint["path"]), "--model", "jaist-qrnn", "--config", str(checkpoint["config"]),
                   "--data", str(corpus["dir"]))
    assert report["track"] == "wikitext103" and report["per"] == "token"
    assert report["samples"] == len(corpus["test"]) - 1  # every test token after the first, predicted once
    expected = _reference_perplexity(checkpoint["state"], corpus["test"], corpus["first"])
    assert report["quality"]["metric"] == "perplexity"
    assert report["quality"]["value"] == pytest.approx(expected, rel=1e-5)


def test_operations_per_token_equal_a_count_of_the_same_tokens(cli, corpus, checkpoint):
    report = _eval(cli, str(checkpoint["path"]), "--model", "jaist-qrnn", "--config", str(checkpoint["config"]),
                   "--data", str(corpus["dir"]))
    model = qrnn.load_qrnn(checkpoint["state"], splits=SPLITS)
    ids = torch.tensor([corpus["first"].index(w) for w in corpus["test"][:-1]]).view(-1, 1)
    with torch.no_grad():
        direct = ms.count(model, ids, track="wikitext103")
    assert direct.samples == report["samples"]
    for key in ("flops", "mults", "adds", "others", "params"):
        assert report[key] == pytest.approx(getattr(direct, key), rel=1e-12), key
    assert report["score"] == pytest.approx(direct.score, rel=1e-12)
    assert report["uncounted"] == []


def test_vocabulary_is_in_order_of_first_appearance(cli, corpus, checkpoint, tmp_path):
    assert corpus["first"] != corpus["frequency"]  # the corpus tells the two orders apart
    assert corpus["first"][-1] == "only_in_test"  # train, then valid, then test
    common = (str(checkpoint["path"]), "--model", "jaist-qrnn", "--config", str(checkpoint["config"]),
              "--data", str(corpus["dir"]))
    default = _eval(cli, *common)["quality"]["value"]
    vocab = tmp_path / "frequency.txt"
    vocab.write_text("\n".join(corpus["frequency"]) + "\n")
    by_frequency = _eval(cli, *common, "--vocab", str(vocab))["quality"]["value"]
    wrong = _reference_perplexity(checkpoint["state"], corpus["test"], corpus["frequency"])
    assert by_frequency == pytest.approx(wrong, rel=1e-5)  # the other order is read as given...
    assert abs(default - wrong) > 1e-3 * wrong  # ...and would give another perplexity


def test_recognised_without_model_name(cli, corpus, checkpoint, tmp_path):
    named = _eval(cli, str(checkpoint["path"]), "--model", "jaist-qrnn", "--config", str(checkpoint["config"]),
                  "--data", str(corpus["dir"]))
    recognised = _eval(cli, str(checkpoint["path"]), "--config", str(checkpoint["config"]), "--data",
                       str(corpus["dir"]))
    assert recognised == named
    # without splits (a small vocabulary, awd-lstm's rule: none): a flat state dict, or an empty criterion
    config = {"vocabulary": len(corpus["first"]), "emsize": 5, "nhid": 7, "nlayers": 2, "splits": []}
    state = make_checkpoint(config, seed=4)
    state["criterion"] = {}
    torch.save(state, tmp_path / "nosplits.pt")
    torch.save(state["model"], tmp_path / "flat.pt")
    a = _eval(cli, str(tmp_path / "nosplits.pt"), "--data", str(corpus["dir"]))
    b = _eval(cli, str(tmp_path / "flat.pt"), "--data", str(corpus["dir"]))
    assert a["quality"]["value"] == b["quality"]["value"]
    assert a["params"] == b["params"] and a["flops"] == b["flops"]


def test_splits_that_the_shapes_contradict_are_one_clear_error(cli, corpus, checkpoint, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("splits: [6]\n")  # the checkpoint has 2 tail clusters
    code, out, err = cli("eval", str(checkpoint["path"]), "--model", "jaist-qrnn", "--config", str(config),
                         "--data", str(corpus["dir"]))
    assert code == 2 and "Traceback" not in out + err
    assert "criterion.tail_vectors" in " ".join(err.split())
