"""Shape-only counting makes the outputs of elementwise ops, cat, attention and activations itself instead of running
torch's (slow, Python) meta kernels. The reference here is torch's own meta kernel run on the same inputs: for a
seeded sweep of sizes, strides (contiguous, transposed and permuted, sliced and strided, expanded, channels-last,
size-1 dims with arbitrary strides), broadcasts and dtypes (float32/64, bfloat16, float16, mixed), the fast output
must have exactly torch's sizes, strides and dtype, and the fast path must take the non-contiguous cases (not only
fall back to torch)."""

from __future__ import annotations

import random

import pytest
import torch

from micronet_score.counting.shapes import META_FAST

aten = torch.ops.aten
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
KINDS = ["contiguous", "permuted", "sliced", "channels_last", "expanded", "odd_ones"]


class Layouts:
    """Random meta tensors of a given shape in every kind of layout."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def of(self, shape: list[int], kind: str) -> torch.Tensor:
        rng, n = self.rng, len(shape)
        if kind == "permuted":
            order = list(range(n))
            rng.shuffle(order)
            base = torch.empty([shape[d] for d in order], device="meta")
            return base.permute([order.index(d) for d in range(n)])
        if kind == "sliced":  # a window (every element or every other) of a larger, maybe permuted, tensor
            big = [s * rng.choice([1, 2]) + rng.choice([0, 1]) for s in shape]
            t = self.of(big, "permuted") if rng.random() < 0.5 else torch.empty(big, device="meta")
            index = []
            for big, s in zip(t.shape, shape, strict=True):
                step = 2 if big >= 2 * s and rng.random() < 0.5 else 1
                index.append(slice(0, s * step, step))
            t = t[tuple(index)]
            assert list(t.shape) == shape
            return t
        if kind == "channels_last" and n in (4, 5):
            fmt = torch.channels_last if n == 4 else torch.channels_last_3d
            return torch.empty(shape, device="meta", memory_format=fmt)
        if kind == "expanded":
            return torch.empty([1 if rng.random() < 0.5 else s for s in shape], device="meta").expand(shape)
        if kind == "odd_ones":  # dims of size 1 may have any stride
            t = self.of(shape, rng.choice(["contiguous", "permuted", "channels_last"]))
            strides = [rng.choice([1, 7, 100]) if s == 1 else st for s, st in zip(t.shape, t.stride(), strict=True)]
            return torch.empty_strided(t.shape, strides, device="meta")
        return torch.empty(shape, device="meta")

    def tensor(self, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        t = self.of(list(shape), self.rng.choice(KINDS))
        return torch.empty_strided(t.shape, t.stride(), dtype=dtype, device="meta")

    def shape(self) -> list[int]:
        return [self.rng.choice([1, 2, 3, 4, 5]) for _ in range(self.rng.choice([1, 2, 3, 4, 4, 5]))]

    def broadcastable(self, shape: list[int]) -> list[int]:
        """Some dims 1, maybe fewer leading dims."""
        smaller = [1 if self.rng.random() < 0.3 else n for n in shape]
        return smaller[self.rng.randrange(len(smaller) + 1) :] if self.rng.random() < 0.3 else smaller


def layout(out) -> list:
    outs = out if isinstance(out, tuple) else (out,)
    return [(tuple(t.shape), t.stride(), t.dtype) for t in outs]


class Tally:
    def __init__(self) -> None:
        self.fast = 0
        self.fast_noncontiguous = 0
        self.cases = 0

    def check(self, op, args: tuple, kwargs: dict | None = None) -> None:
        kwargs = kwargs or {}
        self.cases += 1
        fast = META_FAST[op](args, kwargs)
        if fast is None:
            return
        self.fast += 1
        inputs = args[0] if isinstance(args[0], (list, tuple)) else args
        if any(isinstance(t, torch.Tensor) and not t.is_contiguous() for t in inputs):
            self.fast_noncontiguous += 1
        expected = op(*args, **kwargs)  # torch's own meta kernel
        assert layout(fast) == layout(expected), (
            op,
            [(tuple(t.shape), t.stride(), t.dtype) for t in inputs if isinstance(t, torch.Tensor)],
            args[1:],
            kwargs,
        )


@pytest.mark.parametrize("seed", [0, 1])
def test_elementwise_and_cat_lay_outputs_out_as_torch_does(seed):
    gen, tally = Layouts(seed), Tally()
    for _ in range(150):
        shape = gen.shape()
        d1 = gen.rng.choice(DTYPES)
        d2 = d1 if gen.rng.random() < 0.7 else gen.rng.choice(DTYPES)
        a = gen.tensor(shape, d1)
        b = gen.tensor(gen.broadcastable(shape) if gen.rng.random() < 0.5 else shape, d2)
        if gen.rng.random() < 0.5:
            a, b = b, a
        for op in (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor):
            tally.check(op, (a, b))
        tally.check(aten.mul.Tensor, (a, 0.5))
        tally.check(aten.add.Tensor, (a, 2))
        tally.check(aten.add.Tensor, (a, b), {"alpha": 1})
        tally.check(aten.mul.Scalar, (a, 3))
        tally.check(aten.div.Scalar, (a, 2.0))
        tally.check(aten.neg.default, (a,))
        tally.check(aten.rsqrt.default, (a,))
        for exponent in (1, 2, 3, 0.5, -1):
            tally.check(aten.pow.Tensor_Scalar, (a, exponent))
        condition = gen.tensor(gen.broadcastable(shape), torch.bool)
        tally.check(aten.where.self, (condition, a, gen.tensor(gen.broadcastable(shape), d1)))
        dim = gen.rng.randrange(len(shape))
        parts = []
        for _ in range(gen.rng.choice([1, 2, 3])):
            part = list(shape)
            part[dim] = gen.rng.choice([1, 2, 3])
            parts.append(gen.tensor(part, d1))
        if gen.rng.random() < 0.2:  # a legacy 1-d empty tensor, which cat skips
            parts.insert(gen.rng.randrange(len(parts) + 1), torch.empty(0, dtype=d1, device="meta"))
        tally.check(aten.cat.default, (parts, dim))
        tally.check(aten.cat.default, (parts, dim - len(shape)))
        for name in ("relu", "hardtanh", "sigmoid", "tanh", "silu", "hardswish", "gelu"):
            tally.check(getattr(aten, name).default, (a,))
    assert tally.fast > tally.cases // 2
    assert tally.fast_noncontiguous > tally.fast // 4  # transposed, sliced, expanded inputs take the fast path


def test_normalisations_softmax_and_reductions_lay_outputs_out_as_torch_does():
    gen, tally = Layouts(2), Tally()
    for _ in range(120):
        shape = gen.shape()
        dtype = gen.rng.choice(DTYPES)
        a = gen.tensor(shape, dtype)
        if len(shape) >= 2:
            tally.check(aten.tril.default, (a,))
            tally.check(aten.tril.default, (a, 1))
        tally.check(aten._softmax.default, (a, -1, False))
        tally.check(aten.mean.dim, (a, [-1], True))
        tally.check(aten.mean.dim, (a, [0], False))
        if dtype == torch.float32:
            tally.check(aten.native_layer_norm.default, (a, [shape[-1]], None, None, 1e-5))
        if dtype == torch.float32 and len(shape) >= 2:
            w = torch.empty(shape[1], device="meta")
            tally.check(aten.native_batch_norm.default, (a, w, w, w, w, False, 0.1, 1e-5))
            tally.check(aten._native_batch_norm_legit_no_training.default, (a, w, w, w, w, 0.1, 1e-5))
    assert tally.fast > 0


def test_rotary_embedding_layouts_of_a_llama_attention():
    """The cases of Hugging Face's apply_rotary_pos_emb on transposed q and k (bfloat16): torch's layouts."""
    tally = Tally()
    q = torch.empty(1, 128, 64, 128, dtype=torch.bfloat16, device="meta").transpose(1, 2)
    cos = torch.empty(1, 1, 128, 128, dtype=torch.bfloat16, device="meta")
    half = q[..., 64:]
    tally.check(aten.neg.default, (half,))
    rotated = aten.cat.default([aten.neg.default(half), q[..., :64]], -1)
    tally.check(aten.cat.default, ([aten.neg.default(half), q[..., :64]], -1))
    tally.check(aten.mul.Tensor, (q, cos))
    tally.check(aten.add.Tensor, (aten.mul.Tensor(q, cos), aten.mul.Tensor(rotated, cos)))
    assert tally.fast == tally.cases == 4


def test_attention_output_equals_torch_meta_math_path():
    """F.scaled_dot_product_attention made directly (shape-only skips the math path's dozen ops): torch's own
    meta output for transposed queries, grouped key/value heads, masks of several shapes, 2-d to 4-d inputs."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gen, made = Layouts(3), 0
    for _ in range(60):
        rank, dtype = gen.rng.choice([2, 3, 4, 4]), gen.rng.choice(DTYPES)
        batch = [gen.rng.choice([1, 2]) for _ in range(rank - 3)]
        heads, kv = gen.rng.choice([(4, 4), (4, 2), (6, 3), (2, 1)])
        if rank == 2:
            heads = kv = None
        length, source, d, dv = gen.rng.choice([1, 5, 8]), gen.rng.choice([1, 5, 8]), 16, gen.rng.choice([8, 16])
        head = [] if heads is None else [heads]
        kv_head = [] if kv is None else [kv]
        q = gen.tensor([*batch, *head, length, d], dtype)
        k = gen.tensor([*batch, *kv_head, source, d], dtype)
        v = gen.tensor([*batch, *kv_head, source, dv], dtype)
        options = {"enable_gqa": heads != kv} if heads != kv else {}
        choice = gen.rng.choice(["none", "causal", "bool", "float"])
        if choice == "causal":
            options["is_causal"] = True
        elif choice != "none":
            scores = [*batch, *head, length, source]
            shape = [1 if gen.rng.random() < 0.5 else n for n in scores][gen.rng.randrange(len(scores)) :]
            options["attn_mask"] = gen.tensor(shape, torch.bool if choice == "bool" else dtype)
        fast = META_FAST[sdpa]((q, k, v), options)
        expected = sdpa(q, k, v, **options)
        if fast is not None:
            made += 1
            assert layout(fast) == layout(expected), (q.shape, k.shape, v.shape, options)
    assert made > 40


@pytest.mark.parametrize("seed", [0, 1])
def test_the_log_softmax_head_ops_lay_outputs_out_as_torch_does(seed):
    """clamp, comparisons with a number, log-softmax, integer offsets, gather and addmm(out=): the ops of a blocked
    log-softmax head (the priced reference of counting.hints), against torch's own meta kernels."""
    gen, tally = Layouts(seed), Tally()
    for _ in range(100):
        shape = gen.shape()
        x = gen.tensor(shape, gen.rng.choice(DTYPES))
        ids = gen.tensor(shape, torch.int64)
        tally.check(aten.clamp.default, (x, -1.5, 2.0))
        tally.check(aten.clamp.default, (ids, 0, 7))
        tally.check(aten.ge.Scalar, (ids, 3))
        tally.check(aten.add.Tensor, (ids, -5))
        tally.check(aten.sub.Tensor, (ids, 5))
        if x.is_floating_point():
            tally.check(aten._log_softmax.default, (x, -1, False))
        index = torch.empty(shape[:-1] + [1], dtype=torch.int64, device="meta")
        tally.check(aten.gather.default, (x, len(shape) - 1, index))
    rows, inner, cols = gen.rng.randint(1, 9), gen.rng.randint(1, 9), gen.rng.randint(1, 9)
    a, b = torch.empty(rows, inner, device="meta"), torch.empty(inner, cols, device="meta")
    bias, out = torch.empty(cols, device="meta"), torch.empty(rows, cols, device="meta")
    fast = META_FAST[aten.addmm.out]((bias, a, b), {"out": out})
    assert fast is out
    assert tally.fast > 0
