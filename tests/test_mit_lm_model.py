"""The MIT-HAN-Lab LM against a naive per-token reference written from the spec, and its streaming behaviour."""

import pytest
import torch
from _mit_reference import TINY, random_state_dict, reference_nll
from micronet_score.models import registry
from micronet_score.models.mit_lm import ActivationQuantizer, MitLM, MitLMConfig, bin_token_counts, example_tokens

from micronet_score.checkpoint import load_weights
from micronet_score.evaluate_lm import evaluate_stream


def tiny_model(quantized=True, dtype=torch.float64, seed=0, **changes):
    cfg = {**TINY, **changes}
    model = MitLM(MitLMConfig.from_mapping({**cfg, "quantized": quantized}))
    sd = random_state_dict(cfg, quantized, seed=seed)
    load_weights(model, sd)
    return model.to(dtype).eval(), sd, cfg


def stream(n=41, seed=1):
    return torch.randint(0, TINY["n_vocab"], (n,), generator=torch.Generator().manual_seed(seed))


def run_chunks(model, tokens, chunk):
    state, out = None, []
    with torch.no_grad():
        for b in range(0, len(tokens) - 1, chunk):
            e = min(b + chunk, len(tokens) - 1)
            nll, state = model(tokens[b:e], tokens[b + 1 : e + 1], state)
            out.append(nll)
    return torch.cat(out)


@pytest.mark.parametrize("quantized", [True, False], ids=["quantize.Transformer", "model.Transformer"])
def test_matches_naive_reference(quantized):
    """Window of C keys with the shared position table, interleaved qkv, reversed clusters, the later tied copy,
    cache, quantizers (or the masked first segment), across chunk boundaries."""
    model, sd, cfg = tiny_model(quantized)
    tokens = stream()
    expected = reference_nll(sd, cfg, tokens, quantized)
    got = run_chunks(model, tokens, chunk=7)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quantized", [True, False], ids=["quantize.Transformer", "model.Transformer"])
@pytest.mark.parametrize("fused", [True, False], ids=["padded-band", "exact-window"])
@pytest.mark.parametrize("block, queries", [(1, 1), (2, 5), (3, 7), (4, 100), (64, 512)])
def test_both_window_plans_match_naive_reference(quantized, fused, block, queries):
    """The attention band (C = 6 keys) and the cache (12 slots) by either plan, blocks that do not divide the chunk
    (7 tokens), blocks wider than the chunk or the window, one query per group: the naive per-token values."""
    model, sd, cfg = tiny_model(quantized)
    for part in [*model.layers, model.loss.cache]:
        part.fused = fused
        part.fused_block, part.fused_queries = block, queries
    for layer in model.layers:
        layer.attention_block, layer.attention_queries = block, queries
    model.loss.cache.block, model.loss.cache.max_queries = block, queries
    tokens = stream()
    torch.testing.assert_close(run_chunks(model, tokens, chunk=7), reference_nll(sd, cfg, tokens, quantized),
                               atol=1e-5, rtol=1e-5)


def test_without_cache_matches_reference():
    model, sd, cfg = tiny_model(use_cache=False)
    tokens = stream(seed=3)
    torch.testing.assert_close(run_chunks(model, tokens, 11), reference_nll(sd, cfg, tokens, use_cache=False),
                               atol=1e-5, rtol=1e-5)


def test_chunk_size_invariance_float32():
    model, _, _ = tiny_model(dtype=torch.float32)
    tokens = stream(60, seed=2)
    whole = run_chunks(model, tokens, 59)
    for chunk in (1, 4, 5, 10, 13):
        torch.testing.assert_close(run_chunks(model, tokens, chunk), whole, atol=1e-5, rtol=1e-5)
    results = {c: evaluate_stream(model, tokens, chunk=c, progress=False).nll for c in (5, 10, 59)}
    assert max(results.values()) - min(results.values()) < 1e-5


def test_memory_and_cache_carry_across_calls():
    model, _, _ = tiny_model()
    tokens = stream(30, seed=4)
    with torch.no_grad():
        _, state = model(tokens[:15], tokens[1:16])
        carried, _ = model(tokens[15:29], tokens[16:30], state)
        fresh, _ = model(tokens[15:29], tokens[16:30])
    whole = run_chunks(model, tokens, 29)
    torch.testing.assert_close(carried, whole[15:], atol=1e-9, rtol=1e-9)
    assert not torch.allclose(fresh, carried)
    assert state.cache.values.tolist() == tokens[16 - TINY["n_cache"] : 16].tolist()  # the last n_cache targets
    assert state.memory[0].kv.shape == (TINY["n_seq"], TINY["n_head"], TINY["n_k"] + TINY["n_v"])


def test_cache_resets_per_split():
    model, sd, cfg = tiny_model()
    tokens = stream(25, seed=5)
    first = evaluate_stream(model, tokens, chunk=8, progress=False)
    second = evaluate_stream(model, tokens, chunk=8, progress=False)
    assert first.nll == pytest.approx(second.nll, abs=1e-12)
    assert first.nll == pytest.approx(reference_nll(sd, cfg, tokens).mean().item(), abs=1e-6)
    assert first.predictions == 24


def test_tied_tables_take_the_loss_copy():
    model, sd, _ = tiny_model()
    for i in range(3):
        assert model.embed.layers[i].weight is model.loss.layers[i].weight
        torch.testing.assert_close(model.embed.layers[i].weight, sd[f"loss.layers.{i}.weight"].double())


def test_quantizer_rounds_half_to_even_by_division():
    q = ActivationQuantizer(9)
    q.max_abs.fill_(1.0)
    q.inv_scale.fill_(0.5)
    x = torch.tensor([0.25, 0.75, -0.25, 3.0, -3.0, 0.2])
    assert q(x).tolist() == [0.0, 1.0, -0.0, 1.0, -1.0, 0.0]
    assert q.output_bits == 9


def test_declared_bits_cover_the_quantized_tensors_and_not_the_position_table_or_layer_norms():
    """bits=9 stores the tensors the authors quantize at 9 bits; pos_emb and the layer norms (kept in floating point
    by quantize.py, declared ``unquantized`` by their modules) at 32."""
    from micronet_score import count

    model, _, _ = tiny_model(dtype=torch.float32)
    tokens = stream()
    for b in (9, 4):
        report = count(model, tokens[:-1], tokens[1:], bits=b)
        tensors = {t.name: t for t in report.tensors}
        assert tensors["layers.0.pos_emb"].bits == 32 and tensors["layers.1.ln2.bias"].bits == 32
        assert tensors["layers.1.ln1.weight"].bits == 32
        for name in ("layers.0.qkv.weight", "loss.layers.2.bias", "embed.layers.1.weight", "loss.clusters.weight"):
            assert tensors[name].bits == b, name


def test_quantizer_modules_declare_output_bits():
    model, _, _ = tiny_model()
    quantizers = [m for m in model.modules() if isinstance(m, ActivationQuantizer)]
    assert len(quantizers) == 7 * TINY["n_layers"] + 1
    assert all(m.output_bits == 9 for m in quantizers)


def test_example_tokens_follow_test_bin_fractions():
    assert bin_token_counts(245569) == [198232, 35479, 11858]
    assert bin_token_counts(1000) == [807, 145, 48]  # largest remainder of 807.26 / 144.48 / 48.29
    cfg = MitLMConfig()
    tokens = example_tokens(cfg, 1000)
    counts = [int(((tokens >= lo) & (tokens < hi)).sum()) for lo, hi in zip(cfg.bin_edges, cfg.bin_edges[1:])]
    assert counts == [807, 145, 48]


def test_registered():
    spec = registry.get("mit-lm")
    assert spec.track == "wikitext103"
    model = spec.build({**spec.default_config, **TINY})
    inputs, targets = spec.example_inputs(model)
    with torch.no_grad():
        nll, _ = model(inputs, targets)
    assert nll.shape == (10_000,) and torch.isfinite(nll).all()
