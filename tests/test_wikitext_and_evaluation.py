"""WikiText tokenisation, vocabularies, the on-disk cache, and the evaluation protocol's edges."""

import contextlib

import numpy as np
import pytest
import torch
from _mit_reference import TINY, random_state_dict
from micronet_score.models.mit_lm import MitLM, MitLMConfig

from micronet_score.checkpoint import load_weights
from micronet_score.data import wikitext
from micronet_score.data.wikitext import Vocabulary, load_split, load_vocabulary, words
from micronet_score.errors import MicronetError
from micronet_score.evaluate_lm import evaluate_splits, evaluate_stream


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "wiki.train.tokens").write_text(" = A = \n\n b a c a\n b\n")
    (tmp_path / "wiki.valid.tokens").write_text("a d\n")
    (tmp_path / "wiki.test.tokens").write_text("c a b\n\n")
    return tmp_path


def test_every_line_ends_with_eos_blank_lines_too(corpus):
    assert list(words(corpus / "wiki.train.tokens")) == [
        "=", "A", "=", "<eos>", "<eos>", "b", "a", "c", "a", "<eos>", "b", "<eos>"]


def test_vocabulary_orders(corpus):
    freq = Vocabulary.by_frequency(corpus / "wiki.train.tokens")
    assert freq.words == ("<eos>", "=", "b", "a", "A", "c")  # 4, 2, 2, 2, 1, 1: ties by first appearance
    first = load_vocabulary(corpus, order="first")
    assert first.words == ("=", "A", "<eos>", "b", "a", "c", "d")


def test_vocabulary_files(corpus, tmp_path):
    np.save(tmp_path / "sorted_vocab.npy", np.array(["c", "b", "a", "<eos>"]))
    assert Vocabulary.from_file(tmp_path / "sorted_vocab.npy").words == ("c", "b", "a", "<eos>")
    (tmp_path / "vocab.txt").write_text("x\ny\n")
    assert load_vocabulary(corpus, vocab_file=tmp_path / "vocab.txt").words == ("x", "y")
    np.save(tmp_path / "pickled.npy", np.array(["a", None], dtype=object))
    with pytest.raises(MicronetError, match="pickled"):
        Vocabulary.from_file(tmp_path / "pickled.npy")


def test_split_is_cached_atomically_and_reused(corpus, tmp_path, monkeypatch):
    vocab = load_vocabulary(corpus, order="first")
    cache = tmp_path / "cache"
    ids = load_split(corpus, "test", vocab, cache_dir=cache)
    assert ids.tolist() == [5, 4, 3, 2, 2] and ids.dtype == torch.int64
    assert len(list(cache.glob("test.*.npy"))) == 1 and not list(cache.glob("*.tmp"))
    monkeypatch.setattr(Vocabulary, "encode", lambda *a, **k: pytest.fail("tokenised again"))
    assert load_split(corpus, "test", vocab, cache_dir=cache).tolist() == ids.tolist()
    (corpus / "wiki.test.tokens").write_text("c c\n")  # a changed file is read again
    monkeypatch.undo()
    assert load_split(corpus, "test", vocab, cache_dir=cache).tolist() == [5, 5, 2]


def test_data_errors(corpus, tmp_path):
    vocab = Vocabulary.by_frequency(corpus / "wiki.train.tokens")
    with pytest.raises(MicronetError, match=r"1 tokens \(1 words\) are not in the vocabulary.*'d'"):
        load_split(corpus, "valid", vocab, cache_dir=tmp_path / "c")
    with pytest.raises(MicronetError, match="data directory not found"):
        load_split(tmp_path / "nope", "test", vocab)
    (corpus / "wiki.test.tokens").write_text("")
    with pytest.raises(MicronetError, match="empty split"):
        load_split(corpus, "test", vocab, cache_dir=tmp_path / "c")
    (corpus / "wiki.valid.tokens").unlink()
    with pytest.raises(MicronetError, match="missing wiki.valid.tokens"):
        load_split(corpus, "valid", vocab)


def tiny_model():
    model = MitLM(MitLMConfig.from_mapping({**TINY, "n_vocab": 7, "cutoffs": [3, 5]}))
    sd = random_state_dict({**TINY, "n_vocab": 7, "cutoffs": [3, 5]})
    load_weights(model, sd)
    return model


class FakeCounter:
    def __init__(self):
        self.samples = []

    @contextlib.contextmanager
    def measure(self, samples):
        self.samples.append(samples)
        yield


def test_evaluate_with_counter_limit_and_splits(corpus):
    model = tiny_model()
    tokens = torch.randint(0, 7, (50,), generator=torch.Generator().manual_seed(0))
    counter = FakeCounter()
    full = evaluate_stream(model, tokens, chunk=20, counter=counter, progress=False)
    assert counter.samples == [20, 20, 9] and full.predictions == 49
    quick = evaluate_stream(model, tokens, chunk=20, limit_tokens=10, progress=False)
    assert quick.predictions == 10
    results = evaluate_splits(model, corpus, ("valid", "test"), order="first", chunk=4, progress=False)
    assert [r.split for r in results] == ["valid", "test"] and results[1].predictions == 4
    assert all(np.isfinite(r.perplexity) for r in results)


def test_evaluation_errors(corpus):
    model = tiny_model()
    with pytest.raises(MicronetError, match="at least 2 tokens"):
        evaluate_stream(model, torch.tensor([1]), progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(MicronetError, match="CUDA is not available"):
            evaluate_stream(model, torch.tensor([1, 2, 3]), device="cuda", progress=False)
    with pytest.raises(MicronetError, match="vocabulary has 6 words but the model predicts 7"):
        evaluate_splits(model, corpus, ("test",), progress=False)


def test_module_has_no_download():
    assert "http" not in open(wikitext.__file__).read()
