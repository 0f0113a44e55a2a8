"""Operation counting of the MIT-HAN-Lab LM with the real Counter: in the evaluation pass, on the example input,
and term by term against the authors' report (seed 001 §3.2; specs/mit-lm.md §5.4), for the full-size model.

Every expected number is derived here by hand from the configuration. Where the authors' report counts less (or
differently) than what the model computes, the assertion states the report's figure, the true figure and why.
"""

import pytest
import torch
from micronet_score.models.mit_lm import (
    TEST_BIN_COUNTS,
    ActivationQuantizer,
    Cache,
    LayerMemory,
    MitLM,
    MitLMConfig,
    example_inputs,
)

from micronet_score import Counter, count
from micronet_score.evaluate_lm import evaluate_stream

SMALL = dict(n_layers=2, n_embed=16, n_embeds=[16, 8, 4], cutoffs=[20, 50], n_vocab=100, n_head=2, n_k=4, n_v=4,
             n_inner=24, n_seq=5, n_cache=12, cache_theta=0.3, cache_lambda=0.2, bits=9)


def dense_model(config: dict | None = None, seed: int = 0) -> MitLM:
    """Random dense weights (no zeros, so every weight's density is 1) and working quantizer ranges."""
    torch.manual_seed(seed)
    model = MitLM(MitLMConfig.from_mapping(config) if config else MitLMConfig(cache_theta=0.02, cache_lambda=0.15))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
        for name, buf in model.named_buffers():
            buf.fill_(4.0 if name.endswith("max_abs") else 4.0 / 255)
    return model.eval()


def counter_for(model: MitLM) -> Counter:
    return Counter(model, track="wikitext103", bits=model.config.bits)


def quantizer_calls(model: MitLM) -> tuple[dict, list]:
    calls: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, ActivationQuantizer):
            hooks.append(m.register_forward_hook(lambda mod, a, o, name=name: calls.__setitem__(
                name, calls.get(name, 0) + 1)))
    return calls, hooks


# ------------------------------------------------------------------------------------- counting in the evaluation


def test_evaluation_counts_the_tokens_it_evaluates_and_the_bin_mix_of_their_inputs():
    cfg = SMALL
    model = dense_model(cfg)
    gen = torch.Generator().manual_seed(0)
    # 241 evaluated inputs with a known histogram: 150 in bin 0, 61 in bin 1, 30 in bin 2; then 60 more tokens
    # that limit_tokens leaves out (all bin 2: counting them would change the bin-2 share).
    head = torch.cat([torch.randint(0, 20, (150,), generator=gen), torch.randint(20, 50, (61,), generator=gen),
                      torch.randint(50, 100, (30,), generator=gen)])
    tokens = torch.cat([head[torch.randperm(241, generator=gen)], torch.randint(50, 100, (60,), generator=gen)])
    counter = counter_for(model)
    result = evaluate_stream(model, tokens, chunk=64, limit_tokens=241, counter=counter, progress=False)
    report = counter.report()
    calls, hooks = quantizer_calls(model)  # the quantizer calls of the same evaluation, run plainly
    evaluate_stream(model, tokens, chunk=64, limit_tokens=241, progress=False)
    for h in hooks:
        h.remove()
    assert result.predictions == 241 and report.samples == 241  # 4 measured calls: 64, 64, 64, 49

    # Embedding projections (no bias): d_i·D mults and (d_i − 1)·D adds per token of bin i, averaged over all.
    d, dims = cfg["n_embed"], cfg["n_embeds"]
    for i, (n_bin, width) in enumerate([(61, dims[1]), (30, dims[2])]):
        row = report.layer(f"embed.projections.{i}")
        assert row.mults == pytest.approx(width * d * n_bin / 241, rel=1e-3)
        assert row.adds == pytest.approx((width - 1) * d * n_bin / 241, rel=1e-3)

    # Per-token work that does not depend on the token: the qkv projection, D·3·H·n_k mults per token.
    assert report.layer("layers.1.qkv").mults == pytest.approx(d * 3 * cfg["n_head"] * cfg["n_k"])

    # Nothing unpriced; every quantizer ran, and its 5 ops per call (neg of max_abs, clamp, div, round, mul) are
    # format conversions, not arithmetic.
    assert report.uncounted == [] and not report.warnings
    assert len(calls) == 7 * cfg["n_layers"] + 1
    assert report.conversions == 5 * sum(calls.values())
    assert all(r.flops == 0 for r in report.layers if r.name in calls)

    # Stored for inference, by hand from the configuration: the tied tables once, the projections (no bias), per
    # layer the position table, two layer norms, qkv, out (no bias) and the FFN, the clusters and the output
    # biases, and the two scalars (max_abs, inv_scale) of each of the 7 per layer + 1 quantizers.
    heads, n_k, inner, L = cfg["n_head"], cfg["n_k"], cfg["n_inner"], cfg["n_layers"]
    edges = [0, *cfg["cutoffs"], cfg["n_vocab"]]
    tables = sum((hi - lo) * w for lo, hi, w in zip(edges, edges[1:], dims))
    projections = 2 * sum(w * d for w in dims[1:])  # input and output side
    qkv = heads * (2 * n_k + cfg["n_v"])
    layer = n_k * (cfg["n_seq"] + 1) + 4 * d + d * qkv + qkv + heads * cfg["n_v"] * d + 2 * d * inner + inner + d
    head = d * len(cfg["cutoffs"]) + len(cfg["cutoffs"]) + cfg["n_vocab"]
    assert report.parameters == tables + projections + L * layer + head + 2 * (7 * L + 1)


def test_example_input_gives_the_projection_costs_at_the_test_split_frequencies():
    model = dense_model(SMALL)
    report = count(model, *example_inputs(model), track="wikitext103", bits=9)
    total = sum(TEST_BIN_COUNTS)  # 245,569 test tokens: 198,232 / 35,479 / 11,858 (seed 001 §3.2)
    d, dims = SMALL["n_embed"], SMALL["n_embeds"]
    assert report.samples == 10_000 and report.uncounted == []
    for i in (1, 2):
        row = report.layer(f"embed.projections.{i - 1}")
        share = TEST_BIN_COUNTS[i] / total
        assert row.mults == pytest.approx(dims[i] * d * share, rel=1e-3)
        assert row.adds == pytest.approx((dims[i] - 1) * d * share, rel=1e-3)


# ------------------------------------------------------------------------------------- the authors' per-op terms


@pytest.fixture(scope="module")
def full_size():
    """The best configuration, dense random weights, in steady state (memory and a full 3,000-slot cache), four
    tokens counted: two of bin 0, one of bin 1, one of bin 2."""
    model = dense_model()
    c = model.config
    gen = torch.Generator().manual_seed(1)
    state = model.new_stream()
    state.memory = [LayerMemory(torch.randn(c.n_seq, c.n_head, c.n_k + c.n_v, generator=gen), c.n_seq)
                    for _ in range(c.n_layers)]
    state.cache = Cache(torch.randn(c.n_cache, c.n_embed, generator=gen),
                        torch.randint(0, c.n_vocab, (c.n_cache,), generator=gen), c.n_cache)
    inputs = torch.tensor([5, 4000, 30000, 7])
    targets = torch.tensor([9, 100000, 3600, 1])
    counter = counter_for(model)
    with torch.no_grad(), counter.measure(samples=4):
        nll, _ = model(inputs, targets, state)
    calls, hooks = quantizer_calls(model)  # the quantizer calls of the same forward, run plainly
    with torch.no_grad():
        model(inputs, targets, state)
    for h in hooks:
        h.remove()
    assert torch.isfinite(nll).all()
    return c, counter.report(), calls


def test_full_size_nothing_uncounted_and_57_quantizers_are_conversions(full_size):
    c, report, calls = full_size
    assert report.uncounted == [] and not report.warnings
    assert len(calls) == 57  # 7 per layer x 8 + the final one
    assert report.conversions == 5 * sum(calls.values())


def test_full_size_layer_terms_match_the_report(full_size):
    c, r, _ = full_size
    D, H, dk, dv, C, inner = c.n_embed, c.n_head, c.n_k, c.n_v, c.window, c.n_inner
    assert (D, H, dk, dv, C, inner) == (256, 8, 24, 24, 97, 768)
    qkv_out = H * (2 * dk + dv)  # 576
    for n in range(c.n_layers):
        p = f"layers.{n}."

        # LayerNorm: report 6D = 1536 "others". Our rule set's normalize: per element 2 mults + 3 adds, per row
        # 2 mults − 1 add + 1 other (mean, variance, rsqrt, normalise), plus the affine γx + β (1 mult + 1 add
        # per element) which the rule set keeps (the authors declared it fusable): 770 + 1023 + 1 = 1794.
        for ln in ("ln1", "ln2"):
            row = r.layer(p + ln)
            assert (row.mults, row.adds, row.others) == (2 * D + 2 + D, 3 * D - 1 + D, 1)

        # qkv: fc 256→576 with bias, as the report: mults D·576, adds (D−1)·576 + 576.
        row = r.layer(p + "qkv")
        assert (row.mults, row.adds) == (D * qkv_out, (D - 1) * qkv_out + qkv_out) == (147456, 147456)

        # q·k: report mults n_k·C·H = 18,624, adds (n_k−1)·C·H = 17,848. The scores row also holds the
        # add of the position term (H·C adds; the report puts one C in its q·pos_emb term) and the 24^−½ scaling
        # (H·C mults, not counted by the report).
        row = r.layer(p + "scores")
        assert row.mults == dk * C * H + H * C and 18624 + 776 == row.mults
        assert row.adds == (dk - 1) * C * H + H * C and 17848 + 776 == row.adds
        # q and k are 9-bit (quant_qkv), so q·k mults count 9/32; the scaling of fp32 logits counts 32/32.
        assert row.flops == pytest.approx(dk * C * H * 9 / 32 + H * C + row.adds)

        # q·pos_emb: report n_k·C = 2,328 mults and (n_k−1)·C + C = 2,328 adds, "the positional embedding is
        # the same for different head". The model computes q_h·r_t for every head (quantize.py:100): H times
        # that, 18,624 mults and 17,848 + 776 adds (the adds of the term to the logits are in the scores row).
        row = r.layer(p + "position")
        assert row.mults == H * dk * C == 8 * 2328
        assert row.adds + H * C == H * ((dk - 1) * C + C) == 8 * 2328
        # pos_emb is stored in fp32 (not quantized), so these mults count 32/32, not the report's 9/32.
        assert row.flops == row.mults + row.adds

        # softmax(97): report 3C − 1 = 290 once per layer. It runs per head: H · 290 = 2,320
        # (C divisions as mults, C − 1 adds, C exps as others).
        row = r.layer(p + "softmax")
        assert (row.mults, row.adds, row.others) == (H * C, H * (C - 1), H * C)
        assert row.mults + row.adds + row.others == H * 290

        # attn·V: as the report, mults C·H·n_v = 18,624, adds (C−1)·H·n_v = 18,432 (9-bit probs and values).
        row = r.layer(p + "weighted")
        assert (row.mults, row.adds) == (C * H * dv, (C - 1) * H * dv) == (18624, 18432)

        # out: fc 192→256 without bias, as the report: 49,152 mults, 48,896 adds.
        row = r.layer(p + "out")
        assert (row.mults, row.adds) == (H * dv * D, (H * dv - 1) * D) == (49152, 48896)

        # FFN: fc 256→768 and fc 768→256 with biases, as the report (393,216 each, mults = adds).
        row = r.layer(p + "fc.0")
        assert (row.mults, row.adds) == (D * inner, (D - 1) * inner + inner) == (196608, 196608)
        row = r.layer(p + "fc.3")
        assert (row.mults, row.adds) == (inner * D, (inner - 1) * D + D) == (196608, 196608)

        # The layer's own ops: the two residual adds (256 each, as the report) and the ReLU, which the report
        # counts as 768 "others" and the official rules as 768 multiplies.
        row = r.layer(p.rstrip("."))
        assert (row.mults, row.adds, row.others) == (inner, 2 * D, 0)


def test_full_size_head_cache_and_embedding_match_the_report(full_size):
    c, r, _ = full_size
    D = c.n_embed
    sizes = [3500, 21500, 242735]
    assert [b - a for a, b in zip(c.bin_edges, c.bin_edges[1:])] == sizes

    # Head fc for bin 0 and the clusters: report 256·3502 mults and 256·3502 adds ((D−1)·3502 + 3502 biases).
    rows = [r.layer("loss.layers.0"), r.layer("loss.clusters")]
    assert sum(x.mults for x in rows) == D * 3502 == 896512
    assert sum(x.adds for x in rows) == (D - 1) * 3502 + 3502 == 896512

    # Tails: report 256·64 + 255·64 + 64·21500 + 64·21500 = 2,784,704 and 256·4 + 255·4 + 4·242735 + 4·242735
    # = 1,943,924: the projection (no bias) then the tied table with its bias, for every token.
    for i, (d, size, total) in enumerate([(64, 21500, 2784704), (4, 242735, 1943924)]):
        proj, table = r.layer(f"loss.projections.{i}"), r.layer(f"loss.layers.{i + 1}")
        assert (proj.mults, proj.adds) == (D * d, (D - 1) * d)
        assert (table.mults, table.adds) == (d * size, (d - 1) * size + size)
        assert proj.mults + proj.adds + table.mults + table.adds == total

    # The three normalisations: report softmax 3n − 1 each = 10,505 + 64,499 + 728,204. The model takes the
    # log-softmax (the loss needs log p): n exps, n − 1 adds, 1 log, n subtractions = 3n each, one more per bin.
    report_softmaxes = [10505, 64499, 728204]  # the report's figures, 3n - 1 for n = 3502, 21500, 242735
    lsm = r.family("log_softmax")
    assert lsm.calls == 3 and lsm.mults == 0
    assert lsm.adds == sum(2 * n - 1 for n in (3502, 21500, 242735))
    assert lsm.others == sum(n + 1 for n in (3502, 21500, 242735))
    assert lsm.adds + lsm.others == sum(report_softmaxes) + 3
    # The head's own row: the three log-softmaxes plus picking the target's log-prob: per bin a clamp of the
    # index (2 comparisons); per tail bin its offset (1 add), the bin test (1 comparison), the cluster + tail sum
    # (1 add) and the select (1 comparison).
    row = r.layer("loss")
    assert (row.mults, row.adds, row.others) == (0, lsm.adds + 4, lsm.others + 3 * 2 + 2 + 2)

    # Cache, n_cache = 3000. Report (notebook, spec §5.4): mults 256·n, adds 255·n, others 3n − 1. (The
    # written report says (256 − 1)·2000 + 2000·3 − 1 = 515,999: 2000 entries, the cache size of training, and
    # no multiplies.) The model also scales each score by θ (n mults), matches each slot's token with the target
    # (n comparisons), selects the matching probabilities (n comparisons) and sums them (n − 1 adds), then mixes
    # with λ in the log domain (log, 2 adds of log λ / log(1 − λ), max, min, sub, exp, log1p, add).
    n = c.n_cache
    assert n == 3000
    soft, cache = r.layer("loss.cache.softmax"), r.layer("loss.cache")
    assert soft.mults + soft.adds + soft.others == 3 * n - 1  # the report's "others" term
    assert cache.mults == D * n + n
    assert cache.adds == (D - 1) * n + (n - 1) + 4
    assert cache.others == n + n + 1 + 2 + 2
    # The dot products are 9-bit (final quantizer, stored keys): 256·n mults at 9/32; θ·score at 32/32.
    assert cache.flops == pytest.approx(D * n * 9 / 32 + n + cache.adds + cache.others)

    # Embedding: report 64·256 + 63·256 = 32,512 per bin-1 token and 4·256 + 3·256 = 1,792 per bin-2 token,
    # averaged by the bin frequencies; here one token in four of each.
    p0, p1 = r.layer("embed.projections.0"), r.layer("embed.projections.1")
    assert (p0.mults, p0.adds) == (64 * D / 4, 63 * D / 4) and p0.mults + p0.adds == 32512 / 4
    assert (p1.mults, p1.adds) == (4 * D / 4, 3 * D / 4) and p1.mults + p1.adds == 1792 / 4
    # Not in the report: the ×16 scale (D mults per token), the bin test of the input id (1 + 3 + 1 comparisons)
    # and the table offset of bin-1/2 ids (1 add for half the tokens here).
    row = r.layer("embed")
    assert (row.mults, row.adds, row.others) == (D, 2 / 4, 5)
    # The root: the negation of log p into the NLL, 1 per token.
    root = r.layer("")
    assert (root.mults, root.adds, root.others) == (0, 0, 1)
