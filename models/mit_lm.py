"""The MIT-HAN-Lab MicroNet language model (WikiText-103 track winner, NeurIPS 2019).

A pre-LN Transformer decoder with an adaptive input embedding, a banded attention of C = n_seq + 1 keys with a
learned relative-position table, an adaptive softmax head tied to the embedding, and a neural cache. The evaluated
class of the authors is ``quantize.Transformer``: 9-bit weights stored de-quantized and 57 activation quantizers.

Per token, for an input id t and the stream of previous tokens (shapes for the best configuration):

* embedding:   e = 16 · E0[t] (bin 0), 16 · P1·E1[t-3500] (bin 1), 16 · P2·E2[t-25000] (bin 2)
* each layer:  a = Q(LN1(x)); [q_h|k_h|v_h] = Q(W_qkv·a + b) per head h (interleaved blocks of 2·n_k + n_v);
               s_ht = (q_h·k_{h,p-96+t} + q_h·r_t) / √n_k over the C = 97 keys t = 0…96 (t = 96 is the token itself,
               keys older than the stream are zero); α = Q(softmax_t(s)); u = Q(concat_h Σ_t α_ht v_{h,p-96+t});
               y = x + W_out·u;  x' = y + Q(W3·Q(ReLU(W0·Q(LN2(y)) + b0)) + b3)
* final:       h = Q(x) (no final LayerNorm)
* head:        log p(w) from log_softmax([W0·h + b0 ‖ W_cl·h + b_cl]) and, for bin i ≥ 1, the cluster column −i plus
               log_softmax(E_i·(Π_i·h) + b_i); the cluster rows are in reverse bin order
* cache:       p_cache(y) = Σ_{j<p, y_j = y} exp(θ h_p·h_j) / Σ_j exp(θ h_p·h_j) over the last n_cache states;
               p(y) = λ p_cache(y) + (1 − λ) p_model(y)

Q is ``round_half_even(clamp(x, ±max_abs) / inv_scale) · inv_scale`` with the stored buffers. The unquantized class
(``model.Transformer``, the authors' float checkpoints) has no quantizers and masks the zero memory instead.

Hebbian softmax, used by the authors in training, updates output rows during training only (and, as written, not
at all); nothing of it runs at evaluation, so nothing of it is here.

Module names and registration order reproduce the authors' state-dict keys, so their files load unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from micronet_score.models._sliding_window import PaddedBand, SlidingWindow
from micronet_score.models.registry import ModelSpec, register
from torch import Tensor, nn
from torch.profiler import record_function

from micronet_score.errors import MicronetError
from micronet_score.hints import priced_as, stored_at

BEST_CACHE_THETA = 0.02021162425847724
BEST_CACHE_LAMBDA = 0.15391452339546033
TEST_BIN_COUNTS = (198232, 35479, 11858)
"""Tokens of the WikiText-103 test split per bin (seed 001, §3.2): the default input-embedding mix."""
CACHE_PAD_SCORE = -1e8
"""Score of an empty cache slot before θ (the authors' fp32 pad value)."""


@dataclass(frozen=True)
class MitLMConfig:
    """Hyperparameters; defaults are the best configuration (8.3M parameters, 9 bits, cache 3000)."""

    n_layers: int = 8
    n_embed: int = 256
    n_embeds: tuple[int, ...] = (256, 64, 4)
    cutoffs: tuple[int, ...] = (3500, 25000)
    n_vocab: int = 267735
    n_head: int = 8
    n_k: int = 24
    n_v: int = 24
    n_inner: int = 768
    n_seq: int = 96
    use_cache: bool = True
    n_cache: int = 3000
    cache_theta: float | None = None
    """None: the trained scalar when the checkpoint has one, else the best configuration's θ."""
    cache_lambda: float | None = None
    cache_params: bool = False
    """The state dict carries trained ``loss.cache_*`` scalars."""
    quantized: bool = True
    """``quantize.Transformer`` (activation quantizers, unmasked zero memory) or ``model.Transformer``."""
    bits: int = 9

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> MitLMConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise MicronetError(f"mit-lm: unknown configuration keys {unknown} (known: {sorted(known)})")
        values = dict(config)
        for key in ("n_embeds", "cutoffs"):
            if key in values:
                values[key] = tuple(int(v) for v in values[key])
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["n_embeds"], d["cutoffs"] = list(self.n_embeds), list(self.cutoffs)
        return d

    @property
    def bin_edges(self) -> tuple[int, ...]:
        return (0, *self.cutoffs, self.n_vocab)

    @property
    def window(self) -> int:
        """C: keys per query (the token itself and n_seq back)."""
        return self.n_seq + 1

    def validate(self) -> None:
        problems = []
        if len(self.n_embeds) != len(self.cutoffs) + 1:
            problems.append(f"n_embeds has {len(self.n_embeds)} widths for {len(self.cutoffs) + 1} bins")
        if list(self.bin_edges) != sorted(set(self.bin_edges)):
            problems.append(f"cutoffs {list(self.cutoffs)} must increase strictly below n_vocab {self.n_vocab}")
        if self.n_embeds and self.n_embeds[0] != self.n_embed:
            problems.append(f"bin 0 width {self.n_embeds[0]} must equal n_embed {self.n_embed}")
        if self.use_cache and self.n_cache < 1:
            problems.append("use_cache needs n_cache >= 1")
        if self.quantized and not 2 <= self.bits <= 32:
            problems.append(f"bits must be 2..32, got {self.bits}")
        if problems:
            raise MicronetError("mit-lm configuration: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------- quantizers


class ActivationQuantizer(nn.Module):
    """Q(x) = round_half_even(clamp(x, −max_abs, max_abs) / inv_scale) · inv_scale, on a symmetric b-bit grid.

    ``max_abs`` and ``inv_scale`` are the authors' stored buffers (``inv_scale`` ≈ max_abs / (2^(b−1) − 1) with a
    truncated mantissa); the division reproduces their rounding bit for bit. ``output_bits`` tells an operation
    counter that what runs here is a format conversion producing b-bit values.
    """

    def __init__(self, bits: int):
        super().__init__()
        self.output_bits = int(bits)
        self.register_buffer("max_abs", torch.tensor(1.0))
        self.register_buffer("inv_scale", torch.tensor(1.0))

    def forward(self, x: Tensor) -> Tensor:
        clamped = torch.clamp(x, -self.max_abs, self.max_abs)
        if torch.is_grad_enabled():
            return torch.round(clamped / self.inv_scale) * self.inv_scale
        return clamped.div_(self.inv_scale).round_().mul_(self.inv_scale)  # evaluation: one buffer, not four

    def extra_repr(self) -> str:
        return f"bits={self.output_bits}"


def _quantizer(cfg: MitLMConfig) -> nn.Module:
    return ActivationQuantizer(cfg.bits) if cfg.quantized else nn.Identity()


def _fast_when_plain(part: nn.Module, fast: Any, reference: Any, *args: Any) -> Any:
    """``fast(*args)`` where plain evaluation may take it (``part.fused``, no gradient), priced under a counter as
    ``reference(*args)`` (a pricing hint: once per shape); else ``reference(*args)`` itself (training, and
    ``fused = False``: the reference counted op by op, for comparisons)."""
    if part.fused and not torch.is_grad_enabled():
        return priced_as(fast, reference, *args)
    return reference(*args)


def _window_scores(window: SlidingWindow, g: Any, q: Tensor, keys: Tensor, position: Tensor, mask: Tensor | None,
                   scale: float) -> Tensor:
    """s = (q_h · k_{p−96+t} + q_h · r_t) · n_k^−½ over the band (plus −inf on masked zero memory)."""
    logits = window.scores(q, keys, g) + window.position(position, g)
    if mask is not None:
        logits = logits + window.arrange(mask, g)
    return logits * scale


# ---------------------------------------------------------------------------------------------- embedding


class AdaptiveEmbedding(nn.Module):
    """e(t) = √n_embed · P_i · E_i[t − cutoff_i] for t in bin i (no projection for bin 0).

    The projection runs only for the tokens of bins ≥ 1, so its cost follows the bin frequencies.
    """

    def __init__(self, cfg: MitLMConfig):
        super().__init__()
        edges = cfg.bin_edges
        self.edges = edges
        self.n_embed = cfg.n_embed
        self.layers = nn.ModuleList(nn.Embedding(edges[i + 1] - edges[i], d) for i, d in enumerate(cfg.n_embeds))
        self.projections = nn.ModuleList(nn.Linear(d, cfg.n_embed, bias=False) for d in cfg.n_embeds[1:])

    def forward(self, tokens: Tensor) -> Tensor:
        n = tokens.shape[0]
        out = tokens.new_zeros((n, self.n_embed), dtype=self.layers[0].weight.dtype)
        positions = torch.arange(n, device=tokens.device)
        last = len(self.layers) - 1
        for i, table in enumerate(self.layers):
            lo, hi = self.edges[i], self.edges[i + 1]
            # the bin test: 1 comparison for the first and last bins, 2 and a logical and for the others
            if len(self.layers) == 1:
                ids, where = tokens, positions
            else:
                if i == 0:
                    in_bin = tokens < hi
                elif i == last:
                    in_bin = tokens >= lo
                else:
                    in_bin = torch.logical_and(tokens >= lo, tokens < hi)
                ids, where = torch.masked_select(tokens, in_bin), torch.masked_select(positions, in_bin)
            if where.numel() == 0:
                continue
            e = table(ids - lo if lo else ids)
            if i > 0:
                e = self.projections[i - 1](e)
            out.index_put_((where,), e)
        return out * math.sqrt(self.n_embed)


# ---------------------------------------------------------------------------------------------- decoder layer


@dataclass
class LayerMemory:
    """The last n_seq (k, v) of a layer, post-quantization: ``(n_seq, n_head, n_k + n_v)``.

    ``filled`` counts the rows that hold real positions (the others are the zero memory of a fresh stream).
    """

    kv: Tensor
    filled: int = 0


class DecoderLayer(nn.Module):
    """One pre-LN block: banded multi-head attention over C = n_seq + 1 keys, then the FFN."""

    def __init__(self, cfg: MitLMConfig):
        super().__init__()
        self.cfg = cfg
        self.pos_emb = nn.Parameter(torch.zeros(cfg.n_k, cfg.window))
        self.ln1 = nn.LayerNorm(cfg.n_embed)
        self.quant_ln1 = _quantizer(cfg)
        self.qkv = nn.Linear(cfg.n_embed, cfg.n_head * (2 * cfg.n_k + cfg.n_v))
        self.quant_qkv = _quantizer(cfg)
        self.quant_attn = _quantizer(cfg)
        self.quant_attnv = _quantizer(cfg)
        self.out = nn.Linear(cfg.n_head * cfg.n_v, cfg.n_embed, bias=False)
        self.ln2 = nn.LayerNorm(cfg.n_embed)
        self.quant_ln2 = _quantizer(cfg)
        # Names as in the authors' nn.Sequential: fc.1 quantizes the ReLU output, fc.2/fc.5 were dropouts (p=0).
        self.fc = nn.Sequential(
            nn.Linear(cfg.n_embed, cfg.n_inner),
            _quantizer(cfg),
            nn.Identity(),
            nn.Linear(cfg.n_inner, cfg.n_embed),
            _quantizer(cfg),
            nn.Identity(),
        )
        self.ln1.unquantized = self.ln2.unquantized = ("weight", "bias")  # layer norms stay fp32
        self.unquantized = ("pos_emb",)  # the position table too (quantize.py keeps both in floating point)
        self.softmax = nn.Softmax(dim=-1)
        self.attention_block = 16
        self.attention_queries = 1024
        self.fused = True
        """Plain evaluation takes :meth:`fused_step` (False: always :meth:`step`, for comparisons)."""
        self.fused_block = 64
        self.fused_queries = 512
        """Padded band products: 64 queries per product (64 + 96 key rows each), 512 queries per group (the
        attention of one layer, 4,032 tokens, 2 threads: 16 ms against 37 ms for the exact plan)."""

    def empty_memory(self, device: torch.device | str | None = None) -> LayerMemory:
        c = self.cfg
        return LayerMemory(torch.zeros(c.n_seq, c.n_head, c.n_k + c.n_v, device=device, dtype=self.pos_emb.dtype))

    def forward(self, x: Tensor, memory: LayerMemory) -> tuple[Tensor, LayerMemory]:
        """The block on ``x`` ``(L, n_embed)`` after ``memory``. Without gradient (and ``fused``) the attention
        runs as padded band products (:meth:`fused_step`); what a counter prices is :meth:`step`, whose products
        are exactly the window's, and since its ops depend on shapes only, once per shape (a pricing hint,
        :func:`~micronet_score.hints.priced_as`), not once per chunk."""
        y, kv = _fast_when_plain(self, self.fused_step, self.step, x, memory.kv, memory.filled)
        return y, LayerMemory(kv, min(self.cfg.n_seq, memory.filled + x.shape[0]))

    def step(self, x: Tensor, kv: Tensor, filled: int) -> tuple[Tensor, Tensor]:
        """The block's output and the new k/v memory (the last n_seq rows) after the memory ``kv`` of which
        ``filled`` rows hold real positions; the attention's products are exactly the window's terms."""
        return self._step(x, kv, filled, SlidingWindow(x.shape[0], self.cfg.window, self.attention_block,
                                                       self.attention_queries))

    def fused_step(self, x: Tensor, kv: Tensor, filled: int) -> tuple[Tensor, Tensor]:
        """:meth:`step`'s values with the attention as padded band products (fewer, larger products)."""
        return self._step(x, kv, filled, PaddedBand(x.shape[0], self.cfg.window, self.fused_block,
                                                    self.fused_queries))

    def _step(self, x: Tensor, kv: Tensor, filled: int, window: SlidingWindow) -> tuple[Tensor, Tensor]:
        attended, kv = self.attention(self.quant_ln1(self.ln1(x)), kv, filled, window)
        y = x + self.out(self.quant_attnv(attended))
        return y + self.ffn(self.quant_ln2(self.ln2(y))), kv

    def ffn(self, a: Tensor) -> Tensor:
        """Q(W3 · Q(ReLU(W0·a + b0)) + b3). The ReLU runs outside its quantizer so that it is priced as an op."""
        hidden = self.fc[1](torch.relu(self.fc[0](a)))
        return self.fc[4](self.fc[3](hidden))

    def attention(self, a: Tensor, memory: Tensor, filled: int, window: SlidingWindow) -> tuple[Tensor, Tensor]:
        """Heads of the C-key band by the plan ``window``; returns the concatenated head outputs
        ``(L, n_head·n_v)`` and the new k/v memory."""
        c = self.cfg
        n = a.shape[0]
        z = self.quant_qkv(self.qkv(a)).view(n, c.n_head, 2 * c.n_k + c.n_v)  # per head [q | k | v]
        q = z[..., : c.n_k]
        # the memory holds quantized k/v of earlier calls (stored_at: the counter sees one call at a time)
        kept = stored_at(memory, c.bits) if c.quantized else memory
        kv = torch.cat([kept, z[..., c.n_k :]], 0)  # (n_seq + L, H, n_k + n_v)
        keys = kv[..., : c.n_k].transpose(0, 1)  # (H, n_seq + L, n_k)
        values = kv[..., c.n_k :].transpose(0, 1)
        qh = q.transpose(0, 1)  # (H, L, n_k)
        # Each term of the attention is its own row in a count (record_function regions, see micronet_score.hints)
        with record_function("position"):
            position = qh @ self.pos_emb  # q_h · r_t for every head: (H, L, C)
        mask = self._memory_mask(filled, n, a.device)
        heads = []
        for g in window.groups:
            with record_function("scores"):
                logits = _window_scores(window, g, qh, keys, position, mask, c.n_k**-0.5)
            probs = self.quant_attn(self.softmax(logits))
            with record_function("weighted"):  # Σ_t α_t v_{p−96+t}
                heads.append(window.weighted_sum(probs, values, g))
        out = torch.cat(heads, dim=-2).transpose(0, 1).reshape(n, c.n_head * c.n_v)
        return out, kv[-c.n_seq :].detach()

    def _memory_mask(self, filled: int, n: int, device: torch.device) -> Tensor | None:
        """−inf on zero-memory keys for the unquantized class (``model.Transformer``); None otherwise."""
        empty = self.cfg.n_seq - filled
        if self.cfg.quantized or empty == 0:
            return None
        mask = torch.zeros(self.cfg.n_seq + n, device=device, dtype=self.pos_emb.dtype)
        mask[:empty] = float("-inf")
        return mask


# ---------------------------------------------------------------------------------------------- softmax head + cache


@dataclass
class Cache:
    """The last n_cache final states and the tokens they predicted; value −1 marks an empty slot.

    ``filled`` counts the slots that hold real states (the others are the empty slots of a fresh split).
    """

    keys: Tensor
    values: Tensor
    filled: int = 0


class BlockLinear(nn.Linear):
    """``nn.Linear`` that can write into a given buffer (the large output tables of the head, block by block)."""

    def forward(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        if out is None or self.bias is None:
            return super().forward(x)
        return torch.addmm(self.bias, x, self.weight.t(), out=out)


class NeuralCache(nn.Module):
    """log(λ p_cache(y) + (1 − λ) p_model(y)) with p_cache(y) = Σ_{j: y_j = y} softmax_j(θ h·h_j) over the
    n_cache previous final states (the authors' cache, written with priced operations).

    Per token: n_cache dot products, θ per score, a softmax over all n_cache slots, the value match (one
    comparison and one select per slot) and the sum of the matched probabilities, then the λ-mixture in the log
    domain. Empty slots of a fresh split are computed too and masked (score −1e8·θ) in the blocks that have them.
    """

    def __init__(self, cfg: MitLMConfig):
        super().__init__()
        self.cfg = cfg
        self.softmax = nn.Softmax(dim=-1)
        self.block = 64
        self.max_queries = 512
        self.fused = True
        """Plain evaluation takes :meth:`fused_step` (False: always :meth:`step`, for comparisons)."""
        self.fused_block = 64
        self.fused_queries = 512

    def forward(
        self, h: Tensor, targets: Tensor, log_p: Tensor, cache: Cache, theta: float, lam: float
    ) -> tuple[Tensor, Cache]:
        """Without gradient (and ``fused``) the window products run as padded band products (:meth:`fused_step`);
        a counter prices :meth:`step`, exactly the window's products, once per shape (a pricing hint)."""
        mixed, keys, values = _fast_when_plain(self, self.fused_step, self.step, h, targets, log_p, cache.keys,
                                               cache.values, cache.filled, theta, lam)
        return mixed, Cache(keys, values, min(self.cfg.n_cache, cache.filled + h.shape[0]))

    def step(self, h: Tensor, targets: Tensor, log_p: Tensor, cache_keys: Tensor, cache_values: Tensor,
             filled: int, theta: float, lam: float) -> tuple[Tensor, Tensor, Tensor]:
        """The mixture and the new cache keys and values, after a cache of which ``filled`` slots hold states."""
        window = SlidingWindow(h.shape[0], self.cfg.n_cache, self.block, self.max_queries)
        return self._step(h, targets, log_p, cache_keys, cache_values, filled, theta, lam, window)

    def fused_step(self, h: Tensor, targets: Tensor, log_p: Tensor, cache_keys: Tensor, cache_values: Tensor,
                   filled: int, theta: float, lam: float) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`step`'s values with the window products as padded band products."""
        window = PaddedBand(h.shape[0], self.cfg.n_cache, self.fused_block, self.fused_queries)
        return self._step(h, targets, log_p, cache_keys, cache_values, filled, theta, lam, window)

    def _step(self, h: Tensor, targets: Tensor, log_p: Tensor, cache_keys: Tensor, cache_values: Tensor,
              filled: int, theta: float, lam: float, window: SlidingWindow) -> tuple[Tensor, Tensor, Tensor]:
        w = self.cfg.n_cache
        kept = stored_at(cache_keys, self.cfg.bits) if self.cfg.quantized else cache_keys  # states of earlier calls
        keys = torch.cat([kept, h], 0)
        values = torch.cat([cache_values, targets], dim=0)
        empty = w - filled  # key rows [0, empty) are empty slots
        parts = []
        for g in window.groups:
            scores = window.scores(h, keys, g) * theta
            slot_values = window.arrange(values, g)
            if g.start < empty:
                scores = scores.masked_fill(slot_values < 0, CACHE_PAD_SCORE * theta)
            probs = self.softmax(scores)
            hit = slot_values == window.queries(targets.unsqueeze(1), g)
            parts.append(torch.where(hit, probs, 0.0).sum(-1).flatten())
        log_cache = torch.log(torch.cat(parts))  # −inf where the target is not in the window
        a = log_cache + math.log(lam)
        b = log_p + math.log1p(-lam)
        high, low = torch.maximum(a, b), torch.minimum(a, b)
        mixed = high + torch.log1p(torch.exp(low - high))  # logaddexp(a, b)
        return mixed, keys[-w:].detach(), values[-w:]


SHIFT_SLACK = 1.0
"""Added to the shift bound of :func:`tail_log_prob` (covers the rounding of the bound's own arithmetic)."""
UNDERFLOW_LOG = -60.0
"""A row whose shifted sum of exponentials is below e^-60 is recomputed with its exact maximum as the shift."""
NARROW_TAIL = 16
"""Tail bins with at most this many input features (the 4-wide bin of the best configuration) are shifted by a
bound computed from the weights; wider ones by their exact running maximum."""
LOG2_E = 1.0 / math.log(2.0)
"""The tails' exponentials are taken as 2^(log2(e)·z) = e^z, the factor folded into the weights: torch's exp2 runs
2.7x faster than exp on the AVX-512 CPU of the benchmarks (0.31 against 0.83 ns per value, one thread)."""


@dataclass(frozen=True)
class TailTable:
    """What :func:`tail_log_prob` needs of a tail's weights, made once for all the row blocks of a call: the
    table [w | b | 1] times log2(e), and for narrow tails max_c |w_ck| per feature and max_c b_c (the shift
    bound's terms)."""

    table: Tensor
    narrow: bool
    weight_scale: Tensor | None = None
    top_bias: Tensor | None = None

    @classmethod
    def of(cls, weight: Tensor, bias: Tensor | None) -> TailTable:
        vocabulary = weight.shape[0]
        bias_or_zero = (bias if bias is not None else weight.new_zeros(vocabulary)).unsqueeze(1)
        table = torch.cat([weight, bias_or_zero, weight.new_ones(vocabulary, 1)], dim=1) * LOG2_E
        if weight.shape[1] <= NARROW_TAIL:
            return cls(table, True, weight.abs().amax(0), bias_or_zero.max())
        return cls(table, False)


def tail_log_prob(x: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor, columns: int,
                  table: TailTable | None = None) -> Tensor:
    """log_softmax(x · weightᵀ + bias)[r, index[r]] for every row r, without writing the (rows, vocabulary)
    log-softmax: the normaliser log Σ_c exp(logit_rc − shift_r) + shift_r is summed over blocks of ``columns``
    vocabulary rows, each block's shifted logits made by one matrix product into a small buffer, exponentiated in
    place and summed. The bias and the shift enter the product as two more input columns (ones against the bias,
    −shift against ones), and so does the factor log2(e) of the exponentials taken as powers of 2
    (:data:`LOG2_E`). ``table``: :meth:`TailTable.of` the weight and bias, when the caller has it already.

    The shift, so that no exponential overflows: for narrow tails, the bound Σ_k |x_rk| · max_c |w_ck| + max_c b_c
    (+ SHIFT_SLACK) of every logit of row r; a row whose sum underflows (the bound far above its largest logit) is
    recomputed with the exact running maximum (online log-sum-exp). Wider tails (where that bound is loose): the
    largest logit of the row's first block of columns; a row whose sum overflows (a later logit more than ~88 above
    it) is recomputed exactly. The target's logit is its own dot product."""
    t = table if table is not None else TailTable.of(weight, bias)
    target = (x * weight[index]).sum(-1)
    if bias is not None:
        target = target + bias[index]
    ones = x.new_ones(x.shape[0], 1)
    biased_x = torch.cat([x, ones], dim=1)
    if t.narrow:
        shift = x.abs() @ t.weight_scale + t.top_bias + SHIFT_SLACK
    else:
        shift = (biased_x @ t.table[:columns, :-1].t()).amax(1) / LOG2_E
    log_sum = _shifted_log_sum_exp(torch.cat([biased_x, -shift.unsqueeze(1)], dim=1), t.table, columns)
    redo = log_sum < UNDERFLOW_LOG if t.narrow else ~torch.isfinite(log_sum)
    if bool(redo.any()):
        log_sum[redo] = _online_log_sum_exp(biased_x[redo], t.table[:, :-1], columns) - shift[redo]
    return target - (shift + log_sum)


def _shifted_log_sum_exp(x: Tensor, weight: Tensor, columns: int) -> Tensor:
    """ln Σ_c 2^(x_r · w_c), the shift (and bias) being columns of x and weight (which carries the log2(e))."""
    rows, vocabulary = x.shape[0], weight.shape[0]
    buffer = x.new_empty(rows * min(columns, vocabulary))
    total = x.new_zeros(rows)
    for c in range(0, vocabulary, columns):
        w = weight[c : c + columns]
        logits = torch.mm(x, w.t(), out=buffer[: rows * len(w)].view(rows, len(w)))
        total += logits.exp2_().sum(1)
    return total.log_()


def _online_log_sum_exp(x: Tensor, weight: Tensor, columns: int) -> Tensor:
    """ln Σ_c 2^(x_r · w_c) (weight carries the log2(e)) with the exact running maximum of each row as its shift."""
    rows, vocabulary = x.shape[0], weight.shape[0]
    buffer = x.new_empty(rows * min(columns, vocabulary))
    high = x.new_full((rows,), float("-inf"))
    total = x.new_zeros(rows)
    for c in range(0, vocabulary, columns):
        w = weight[c : c + columns]
        logits = torch.mm(x, w.t(), out=buffer[: rows * len(w)].view(rows, len(w)))
        new_high = torch.maximum(high, logits.amax(1))
        total.mul_(torch.exp2(high - new_high)).add_(logits.sub_(new_high.unsqueeze(1)).exp2_().sum(1))
        high = new_high
    # the maximum back to natural units in float64 (one rounding, to the result's dtype)
    return (high.double() / LOG2_E + total.double().log()).to(x.dtype)


class AdaptiveSoftmax(nn.Module):
    """The adaptive softmax head (cluster rows in reverse bin order) and the neural cache mixture (``cache``)."""

    def __init__(self, cfg: MitLMConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.cache_params:
            self.cache_theta_inv_softplus = nn.Parameter(torch.tensor(math.log(math.expm1(0.016))))
            self.cache_lambda_inv_sigmoid = nn.Parameter(torch.tensor(math.log(0.07 / 0.93)))
            self.unquantized = ("cache_theta_inv_softplus", "cache_lambda_inv_sigmoid")  # trained fp32 scalars
        edges = cfg.bin_edges
        self.edges = edges
        if cfg.cutoffs:
            self.clusters = nn.Linear(cfg.n_embed, len(cfg.cutoffs))
        self.layers = nn.ModuleList(BlockLinear(d, edges[i + 1] - edges[i]) for i, d in enumerate(cfg.n_embeds))
        self.projections = nn.ModuleList(nn.Linear(cfg.n_embed, d, bias=False) for d in cfg.n_embeds[1:])
        self.cache = NeuralCache(cfg)
        self.block_elements = 1 << 23
        """Reference path: logits per block of rows of the widest bin (34 rows of 242,735: 32 MB, two re-used
        buffers): blocks of 4-69 rows measured within 10% of each other on a 2-core CPU."""
        self.fused = True
        """Plain evaluation takes the fused path (False: always the reference path, for comparisons)."""
        self.fused_rows = 256
        """Fused path: rows per block (the head's log-softmax over 256 x 3,502 logits; the tails' token blocks)."""
        self.fused_columns = 512
        """Fused path: vocabulary columns per tail block (256 x 512 logits, 512 KB: stays in a core's 1 MB L2;
        0.62-0.8x the reference head's time per 4,032 tokens on one thread of the 2-core AMD EPYC, against
        0.68-0.8x for 128 x 1,024 and 256 x 1,024 and 0.74x for 256 x 2,048, on a loaded machine)."""

    def theta_lambda(self) -> tuple[float, float]:
        """θ and λ: the configured values, else the trained scalars, else the best configuration's."""
        theta, lam = self.cfg.cache_theta, self.cfg.cache_lambda
        if theta is None:
            theta = F.softplus(self.cache_theta_inv_softplus).item() if self.cfg.cache_params else BEST_CACHE_THETA
        if lam is None:
            lam = torch.sigmoid(self.cache_lambda_inv_sigmoid).item() if self.cfg.cache_params else BEST_CACHE_LAMBDA
        return float(theta), float(lam)

    def forward(self, h: Tensor, targets: Tensor) -> Tensor:
        """log p_model(target) for each row of h. The full distribution of every row is normalised (all bins).

        Two computations of the same values: without gradient the fused path runs (:meth:`_log_prob_fused`,
        which never writes the tail bins' log-softmax), priced under a counter as the reference path
        (:meth:`_log_prob_reference`, the log-softmax of every bin) through a pricing hint
        (:func:`~micronet_score.hints.priced_as`): the count is the reference's, op by op. Training,
        shape-only counting (meta tensors), other dispatch modes and ``fused = False`` run the reference path."""
        return _fast_when_plain(self, self._log_prob_fused, self._log_prob_reference, h, targets)

    def _log_prob_reference(self, h: Tensor, targets: Tensor) -> Tensor:
        """The log-softmax of every bin, block by block of rows, into buffers re-used from block to block: the
        ops the rules price."""
        sizes = [b - a for a, b in zip(self.edges, self.edges[1:])]
        rows = max(1, min(len(h), self.block_elements // max(sizes)))
        if h.is_meta:  # priced or shape-only: no memory to bound, so one block (the same counts, fewer calls)
            rows = max(1, len(h))
        reuse = not torch.is_grad_enabled()  # out= buffers only where no gradient is recorded
        buffers = [(h.new_empty(rows, size), h.new_empty(rows, size)) for size in sizes[1:]] if reuse else None
        parts = []
        for i in range(0, len(h), rows):
            block = h[i : i + rows]
            use = buffers if buffers is not None and len(block) == rows else None
            parts.append(self._log_prob_block(block, targets[i : i + rows], use))
        return torch.cat(parts)

    def _log_prob_fused(self, h: Tensor, targets: Tensor) -> Tensor:
        """The reference path's values for the targets, each computed where it is needed: the head bin (with the
        cluster columns) by log-softmax per block of ``fused_rows`` rows for every token; a tail bin's normaliser
        (:func:`tail_log_prob`, blocks of ``fused_rows`` rows) only for the tokens whose target lies in that bin, as
        no other token's log-probability involves it. What is counted (the pricing hint) is the reference: every
        bin normalised for every token, as a deployed model computing the distribution does."""
        n_tails = len(self.layers) - 1
        out = h.new_empty(len(h))
        cluster_lp = h.new_empty(len(h), n_tails)  # log p(bin j) for j = n_tails ... 1 (the clusters' order)
        for i in range(0, len(h), self.fused_rows):
            block, block_targets = h[i : i + self.fused_rows], targets[i : i + self.fused_rows]
            head = self.layers[0](block)
            if self.cfg.cutoffs:
                head = torch.cat([head, self.clusters(block)], dim=-1)
            head_lp = torch.log_softmax(head, dim=-1)
            index = block_targets.clamp(self.edges[0], self.edges[1] - 1).unsqueeze(1)
            out[i : i + len(block)] = head_lp.gather(1, index).squeeze(1)
            cluster_lp[i : i + len(block)] = head_lp[:, len(head_lp[0]) - n_tails :]
        for j in range(1, n_tails + 1):
            lo, hi = self.edges[j], self.edges[j + 1]
            rows = torch.logical_and(targets >= lo, targets < hi).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            table, prepared = self.layers[j], TailTable.of(self.layers[j].weight, self.layers[j].bias)
            x, index = self.projections[j - 1](h[rows]), targets[rows] - lo
            tail = torch.cat([tail_log_prob(x[k : k + self.fused_rows], table.weight, table.bias,
                                            index[k : k + self.fused_rows], self.fused_columns, prepared)
                              for k in range(0, len(rows), self.fused_rows)])
            out[rows] = cluster_lp[rows, n_tails - j] + tail  # bin j's cluster column is −j
        return out

    log_prob = forward

    def _log_prob_block(self, h: Tensor, targets: Tensor, buffers: list | None) -> Tensor:
        head = self.layers[0](h)
        if self.cfg.cutoffs:
            head = torch.cat([head, self.clusters(h)], dim=-1)
        head_lp = torch.log_softmax(head, dim=-1)
        lo, hi = self.edges[0], self.edges[1]
        out = head_lp.gather(1, targets.clamp(lo, hi - 1).unsqueeze(1)).squeeze(1)
        for i in range(1, len(self.layers)):
            lo, hi = self.edges[i], self.edges[i + 1]
            logits_buf, lp_buf = buffers[i - 1] if buffers is not None else (None, None)
            logits = self.layers[i](self.projections[i - 1](h), out=logits_buf)
            if lp_buf is None:
                tail_lp = torch.log_softmax(logits, dim=-1)
            else:
                tail_lp = torch._log_softmax(logits, -1, False, out=lp_buf)
            tail = tail_lp.gather(1, (targets.clamp(lo, hi - 1) - lo).unsqueeze(1)).squeeze(1)
            # bins in increasing order: a target of bin i ≥ 1 takes cluster column −i plus its tail log-prob
            out = torch.where(targets >= lo, head_lp[:, -i] + tail, out)
        return out

    def empty_cache(self, device: torch.device | str | None = None) -> Cache:
        keys = torch.zeros(self.cfg.n_cache, self.cfg.n_embed, device=device, dtype=self.layers[0].weight.dtype)
        return Cache(keys, torch.full((self.cfg.n_cache,), -1, dtype=torch.long, device=device), 0)

    def mix_cache(self, h: Tensor, targets: Tensor, log_p: Tensor, cache: Cache) -> tuple[Tensor, Cache]:
        """log(λ p_cache + (1 − λ) p_model) over the n_cache previous states (empty slots computed too)."""
        theta, lam = self.theta_lambda()
        return self.cache(h, targets, log_p, cache, theta, lam)


# ---------------------------------------------------------------------------------------------- the model


@dataclass
class StreamState:
    """What flows from one call to the next within a split: per-layer k/v memory and the cache."""

    memory: list[LayerMemory]
    cache: Cache | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class MitLM(nn.Module):
    """The MIT-HAN-Lab MicroNet Transformer language model, evaluated one stream (batch 1) at a time."""

    def __init__(self, cfg: MitLMConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed = AdaptiveEmbedding(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.quant = _quantizer(cfg)
        self.loss = AdaptiveSoftmax(cfg)
        for i in range(len(cfg.n_embeds)):  # tied output/input tables (the later key wins when loading)
            self.loss.layers[i].weight = self.embed.layers[i].weight

    def new_stream(self, device: torch.device | str | None = None) -> StreamState:
        """Zero memory and an empty cache: the start of a split."""
        device = device if device is not None else self.layers[0].pos_emb.device
        cache = self.loss.empty_cache(device) if self.config.use_cache else None
        return StreamState([layer.empty_memory(device) for layer in self.layers], cache)

    def hidden(self, inputs: Tensor, state: StreamState) -> tuple[Tensor, list[LayerMemory]]:
        """The final quantized states h ``(L, n_embed)`` and the new per-layer memory."""
        x = self.embed(inputs)
        memory = []
        for layer, mem in zip(self.layers, state.memory):
            x, mem = layer(x, mem)
            memory.append(mem)
        return self.quant(x), memory

    def forward(
        self, inputs: Tensor, targets: Tensor, state: StreamState | None = None
    ) -> tuple[Tensor, StreamState]:
        """Per-token NLL ``(L,)`` of ``targets`` given ``inputs`` (``(L,)`` ids) and the stream so far."""
        if inputs.dim() != 1 or inputs.shape != targets.shape:
            raise MicronetError(f"mit-lm takes 1-d inputs and targets of equal length (batch 1), got "
                                f"{tuple(inputs.shape)} and {tuple(targets.shape)}")
        state = state if state is not None else self.new_stream(inputs.device)
        h, memory = self.hidden(inputs, state)
        log_p = self.loss(h, targets)
        cache = state.cache
        if self.config.use_cache:
            log_p, cache = self.loss.mix_cache(h, targets, log_p, state.cache)
        return -log_p, StreamState(memory, cache)


# ---------------------------------------------------------------------------------------------- configuration


def config_from_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The hyperparameters that the authors' tensor shapes determine (n_v is taken equal to n_k)."""
    need = ["layers.0.pos_emb", "layers.0.qkv.weight", "layers.0.fc.0.weight", "embed.layers.0.weight"]
    missing = [k for k in need if k not in state_dict]
    if missing:
        raise MicronetError(f"not a MIT-HAN-Lab LM state dict: no {', '.join(missing)}")
    n_layers = 0
    while f"layers.{n_layers}.pos_emb" in state_dict:
        n_layers += 1
    n_k, window = state_dict["layers.0.pos_emb"].shape
    width, n_embed = state_dict["layers.0.qkv.weight"].shape
    if width % (3 * n_k):
        raise MicronetError(f"mit-lm: qkv width {width} is not n_head·3·n_k with n_k = {n_k} (from pos_emb)")
    sizes, n_embeds = [], []
    while f"embed.layers.{len(sizes)}.weight" in state_dict:
        rows, d = state_dict[f"embed.layers.{len(sizes)}.weight"].shape
        sizes.append(int(rows))
        n_embeds.append(int(d))
    cutoffs = [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]
    return {
        "n_layers": n_layers,
        "n_embed": int(n_embed),
        "n_embeds": n_embeds,
        "cutoffs": cutoffs,
        "n_vocab": sum(sizes),
        "n_head": int(width // (3 * n_k)),
        "n_k": int(n_k),
        "n_v": int(n_k),
        "n_inner": int(state_dict["layers.0.fc.0.weight"].shape[0]),
        "n_seq": int(window) - 1,
        "cache_params": "loss.cache_theta_inv_softplus" in state_dict,
        "quantized": any(k.endswith(".max_abs") for k in state_dict),
    }


def build(config: Mapping[str, Any]) -> MitLM:
    return MitLM(MitLMConfig.from_mapping(config))


# ---------------------------------------------------------------------------------------------- example input


def bin_token_counts(n: int, counts: tuple[int, ...] = TEST_BIN_COUNTS) -> list[int]:
    """Split n tokens over the bins in the proportions ``counts`` (largest remainder)."""
    total = sum(counts)
    exact = [n * c / total for c in counts]
    out = [math.floor(e) for e in exact]
    for i in sorted(range(len(counts)), key=lambda i: exact[i] - out[i], reverse=True)[: n - sum(out)]:
        out[i] += 1
    return out


def example_tokens(cfg: MitLMConfig, n: int = 1000, seed: int = 0) -> Tensor:
    """n token ids whose bin histogram matches the WikiText-103 test split's (198,232 / 35,479 / 11,858)."""
    edges = cfg.bin_edges
    counts = bin_token_counts(n, TEST_BIN_COUNTS[: len(edges) - 1] if len(edges) - 1 <= 3 else (1,) * (len(edges) - 1))
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randint(edges[i], edges[i + 1], (c,), generator=gen) for i, c in enumerate(counts)]
    tokens = torch.cat(parts)
    return tokens[torch.randperm(n, generator=gen)]


EXAMPLE_TOKENS = 10_000
"""Predictions of the example input: enough that every bin's share is within 0.1% of the test split's (1,445 and
483 tokens of bins 1 and 2 for 0.14448 and 0.04829), so a count gives the embedding projections' average cost."""


def example_inputs(model: MitLM, n: int = EXAMPLE_TOKENS) -> tuple[Tensor, Tensor]:
    """(inputs, targets) of n predictions for counting without data; the inputs follow the test-set bin mix."""
    device = model.layers[0].pos_emb.device
    inputs = example_tokens(model.config, n, seed=0).to(device)
    targets = example_tokens(model.config, n, seed=1).to(device)
    return inputs, targets


# ---------------------------------------------------------------------------------------------- the demo


def demo_paths() -> tuple[Path, Path, Path]:
    """(checkpoint, config.yaml, data directory) of the bundled demo: a tiny model in the authors' format."""
    root = Path(str(resources.files("micronet_score.models") / "demo"))
    return root / "mit_lm_demo.pth", root / "mit_lm_demo.yaml", root / "wikitext-demo"


register(
    ModelSpec(
        name="mit-lm",
        title="MIT-HAN-Lab MicroNet Transformer LM (adaptive embedding, banded attention, neural cache)",
        track="wikitext103",
        build=build,
        default_config=MitLMConfig().to_dict(),
        config_from_state_dict=config_from_state_dict,
        example_inputs=example_inputs,
        aliases=("mit-han-lab-lm",),
    )
)
