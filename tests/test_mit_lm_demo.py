"""The bundled demo: the authors' file format, loads unchanged, and has learnt its corpus."""

import torch
from micronet_score.models.mit_lm import demo_paths

from micronet_score.checkpoint import load_model
from micronet_score.data.wikitext import load_split, load_vocabulary
from micronet_score.evaluate_lm import evaluate_stream


def test_demo_is_in_the_authors_format_and_learnt_its_corpus(tmp_path):
    checkpoint, config, data = demo_paths()
    raw = torch.load(checkpoint, weights_only=True)
    assert set(raw) == {"net", "step"} and raw["step"] == 1
    assert raw["net"]["quant.max_abs"].shape == (1,) and raw["net"]["quant.inv_scale"].shape == ()
    loaded = load_model(checkpoint, config=config)
    assert loaded.config["bits"] == 9 and loaded.config["quantized"]
    vocab = load_vocabulary(data, cache_dir=tmp_path)
    tokens = load_split(data, "test", vocab, cache_dir=tmp_path)
    result = evaluate_stream(loaded.model, tokens, limit_tokens=3000, progress=False)
    assert result.perplexity < 0.05 * len(vocab)
