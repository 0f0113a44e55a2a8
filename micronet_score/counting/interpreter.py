"""The counting interpreter: a TorchDispatchMode that prices every aten op of the real forward.

Module attribution comes from global forward pre/post hooks installed only while counting: every op is
charged to the innermost module of the model that is running. Each op's price comes from its handler in
:mod:`ops` (a pure function of the call and the prices); the interpreter applies the returned charge: it
tallies the bill at the operands' widths and records what the call tells the storage accounting. Widths of
operands come from the weight table (by storage), from fake-quantization marks, from a quantized or narrow
float dtype, or from the declared activation width; they flow through ops by the table in :mod:`flow`.

Scaled dot-product attention is priced once per call of ``F.scaled_dot_product_attention`` (a function mode
sees the call), whichever kernel then runs it, so the fused kernels and the math path cost the same.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from micronet_score.counting.bits import FLOAT_BITS, BitPolicy, Marks
from micronet_score.counting.costs import Bill, Prices, dot_product
from micronet_score.counting.flow import FLOW, Flow
from micronet_score.counting.grid import QUANTIZED
from micronet_score.counting.ops import FREE, TABLE, Charge, Handler, Op, attention_charge, mha_bill
from micronet_score.counting.packed import Packed
from micronet_score.counting.shapes import META_FAST
from micronet_score.counting.storage import FoldedNorm, TensorInfo, WeightTable, storage_key
from micronet_score.errors import CountingBug
from micronet_score.hints import LISTENERS

_in_backward = torch._C._current_graph_task_id
"""-1 outside autograd's backward pass; the id of the graph task while it runs (on any thread)."""


_profiler = torch.ops.profiler
_REGION_ENTER = {_profiler._record_function_enter_new.default, _profiler._record_function_enter.default}
_REGION_EXIT = {_profiler._record_function_exit._RecordFunction, _profiler._record_function_exit.default}
_REGIONS = _REGION_ENTER | _REGION_EXIT
"""``torch.profiler.record_function(name)``: ops inside are charged to the row ``<module>.<name>`` (see hints)"""


def _unpriced(op: Op, prices: Prices) -> Charge:
    return Charge(unpriced=op.name)


_RESOLVED: dict[Any, tuple[Handler | None, Flow | None]] = {}
"""aten OpOverload -> (pricing handler, width flow); (None, None): free. Filled on first sight of each overload."""


def resolve(func: Any) -> tuple[Handler | None, Flow | None]:
    """The handler and width flow of an overload: priced, moving widths, free, or unpriced (never silent)."""
    packet = func.overloadpacket
    handler, flow = TABLE.get(packet), FLOW.get(packet)
    if handler is None and flow is None and packet not in FREE:
        handler = _unpriced
    _RESOLVED[func] = (handler, flow)
    return handler, flow


def _elements(out: Any) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() if not out.is_nested else 0
    if isinstance(out, (tuple, list)):
        return sum(_elements(o) for o in out)
    return 0


@dataclass(slots=True)
class Counts:
    """Raw counts and their 32-bit-equivalent operations."""

    mults: float = 0.0
    adds: float = 0.0
    others: float = 0.0
    flops: float = 0.0

    def add(self, other: Counts) -> None:
        self.mults += other.mults
        self.adds += other.adds
        self.others += other.others
        self.flops += other.flops


@dataclass(slots=True)
class FamilyCounts(Counts):
    """Counts of one op family and the number of ops that paid them."""

    calls: int = 0

    def add(self, other: Counts) -> None:
        Counts.add(self, other)
        if isinstance(other, FamilyCounts):
            self.calls += other.calls


@dataclass(slots=True)
class Uncounted:
    """An op without a price in one module: its calls and output elements."""

    calls: int = 0
    elements: int = 0


class Tally:
    """Counts per module path and per op family; uncounted ops; free format conversions."""

    def __init__(self) -> None:
        self.rows: dict[str, Counts] = {}
        self.families: dict[str, FamilyCounts] = {}
        self.uncounted: dict[tuple[str, str], Uncounted] = {}
        self.conversions = 0

    def merge(self, other: Tally) -> None:
        for path, counts in other.rows.items():
            self.rows.setdefault(path, Counts()).add(counts)
        for family, counts in other.families.items():
            self.families.setdefault(family, FamilyCounts()).add(counts)
        for key, op in other.uncounted.items():
            mine = self.uncounted.setdefault(key, Uncounted())
            mine.calls += op.calls
            mine.elements += op.elements
        self.conversions += other.conversions

    def adjust(self, path: str, family: str, mults: float, adds: float, others: float, flops: float) -> None:
        """Change the counts of one module row and family (the dot products of a representation chosen after the
        forward)."""
        change = Counts(mults, adds, others, flops)
        self.rows.setdefault(path, Counts()).add(change)
        self.families.setdefault(family, FamilyCounts()).add(change)


class OperandFacts:
    """The read-only facts a handler may ask about its operands (see :class:`ops.Facts`)."""

    def __init__(self, table: WeightTable, derived: dict[int, TensorInfo], stack: list[str], activation: int):
        self.weights = table.by_key
        self.table = table
        self.derived = derived
        self.stack = stack
        self.activation = activation
        self.linear: torch.Tensor | None = None
        """the output of the last conv/linear"""
        self.dots: list[tuple[TensorInfo, float, float]] = []
        """the stored weights of the call being priced, with their dot products' terms and outputs (dot() notes
        them, the interpreter's record() takes them)"""

    def dot(self, prices: Prices, terms: float, outputs: float, *operands: torch.Tensor) -> Bill:
        for tensor in operands:
            if tensor.is_nested:
                continue
            key = storage_key(tensor)
            info = self.weights.get(key) or self.derived.get(key)
            if info is not None:
                self.dots.append((info.source or info, terms, outputs))
                break
        return dot_product(prices, terms, outputs)

    def follows_linear(self, tensor: Any) -> bool:
        return tensor is self.linear and tensor is not None

    def packed(self) -> Packed | None:
        return self.table.packed.get(self.stack[-1]) if self.stack and self.table.packed else None

    def pruned_info(self, args: tuple) -> TensorInfo | None:
        """``weight_orig * weight_mask`` of torch.nn.utils.prune: the product is the weight, not inference work."""
        if not self.table.pruned or len(args) < 2 or not isinstance(args[1], torch.Tensor):
            return None
        a, b = storage_key(args[0]), storage_key(args[1])
        pruned = self.table.pruned.get((a, b)) or self.table.pruned.get((b, a))
        return pruned.info if pruned is not None else None

    def pruned(self, args: tuple) -> bool:
        return self.pruned_info(args) is not None


_ATTENTION = frozenset(
    {F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention,
     torch.ops.aten.scaled_dot_product_attention.default, torch.ops.aten._scaled_dot_product_attention_math,
     torch.ops.aten._scaled_dot_product_attention_math.default}
)  # fmt: skip
"""scaled_dot_product_attention and its math path: (q, k, v, attn_mask, dropout_p, is_causal, ...)"""


_FAST_PATHS = (torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer, torch.nn.TransformerEncoder)
"""Modules whose forward takes a fused fast path (nested tensors included) only when no function mode is
active: the attention function mode steps aside while they run, so that what is counted is what runs."""


def _may_take_fast_path(module: torch.nn.Module) -> bool:
    """torch's necessary conditions for the fast path: inference, and no autograd graph to record. Otherwise the
    function mode stays and prices F.multi_head_attention_forward as the fast path's fused op is priced."""
    if module.training:
        return False
    return not torch.is_grad_enabled() or not any(p.requires_grad for p in module.parameters())


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


class _AttentionCalls(TorchFunctionMode):
    """Sees calls of scaled_dot_product_attention before a kernel is chosen: the call is priced once by the
    rule set's attention policy and the kernel's own ops are not priced again."""

    def __init__(self, counting: CountingMode):
        super().__init__()
        self.counting = counting

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _ATTENTION:
            return self.counting.attention(func, args, kwargs)
        if func is F.multi_head_attention_forward:
            return self.counting.multi_head_attention(func, args, kwargs)
        return func(*args, **kwargs)


_UNKNOWN = object()
"""A tensor whose pricing facts no memo entry may stand for."""


class PricedCall:
    """What pricing a hint's reference charged (its tally and dense dot products of stored weights), the stored
    tensors it read (by storage key), and what it told of its outputs (a stored tensor's info or a mark, per
    output): added again, as it was, for a call of the same signature."""

    def __init__(self, tally: Tally, dot_uses: dict, read: set[int]) -> None:
        self.tally = tally
        self.dot_uses = dot_uses
        self.read = read
        self.outputs: list[Any] = []

    def add_to(self, mode: CountingMode) -> None:
        mode.facts.linear = None  # the reference's last linear output was a meta copy: nothing outside follows it
        mode.read |= self.read
        mode.watch -= self.read
        mode.tally.merge(self.tally)
        for key, (info, uses) in self.dot_uses.items():
            mine = mode.dot_uses.setdefault(key, (info, {}))[1]
            for use, outputs in uses.items():
                mine[use] = mine.get(use, 0.0) + outputs

    def replay(self, mode: CountingMode, outputs: list[torch.Tensor]) -> None:
        self.add_to(mode)
        for tensor, identity in zip(outputs, self.outputs, strict=True):
            if isinstance(identity, TensorInfo):
                mode.derive(tensor, identity)
            elif identity is not None:
                mode.marks.set(tensor, identity)


class PricingMemo:
    """Priced hint references by signature, for the life of one weight table (its infos are in the keys)."""

    LIMIT = 1024
    """entries kept at most (a model whose signatures never repeat starts over rather than growing)"""

    def __init__(self, table: WeightTable) -> None:
        self.table = table
        self.stored = {id(info) for info in table.by_key.values()} | {id(p.info) for p in table.pruned.values()}
        self.entries: dict[Any, PricedCall] = {}

    def keep(self, key: Any, priced: PricedCall) -> None:
        if len(self.entries) >= self.LIMIT:
            self.entries.clear()
        self.entries[key] = priced


class CountingMode(TorchDispatchMode):
    """Prices each aten op by the rule set and charges it to the running module."""

    def __init__(
        self, prices: Prices, policy: BitPolicy, table: WeightTable, names: dict[int, str], output_bits: dict[int, int]
    ):
        super().__init__()
        self.prices = prices
        self.policy = policy
        self.table = table
        self.weights = table.by_key
        self.names = names
        self.output_bits = output_bits
        self.marks = Marks()
        self.tally = Tally()
        self.stack: list[str] = []
        self.regions: list[str] = []
        """the rows of the open record_function regions, innermost last"""
        self.converting = 0
        self.quiet = 0
        """inside an op priced as a whole (attention): its inner ops are not priced"""
        self.derived: dict[int, TensorInfo] = {}
        self._alive: list[torch.Tensor] = []
        self.facts = OperandFacts(table, self.derived, self.stack, policy.activation)
        self.norms: dict[str, FoldedNorm] = {}
        self.dropped: set[int] = set()
        self.read: set[int] = set()
        self.first_input: Any = None
        self.first_input_seen: Any = None
        """first_input as it was when the forward ended (finish() forgets first_input)"""
        self.backward_ops = 0
        """ops run by autograd's backward pass while counting: training work, never counted"""
        self.dot_uses: dict[int, tuple[TensorInfo, dict[tuple[str, int, int, float], float]]] = {}
        """id(info) -> (info, {(module, mult bits, other bits, terms): outputs}): each weight's dense dot products"""
        self.watch = {key for key, info in table.by_key.items() if info.is_parameter}
        """parameters no op has taken yet (any op that takes one marks it read: needed for inference)"""
        self.meta_fallbacks: dict[Any, Any] | None = None
        self.meta_fast: dict[Any, Any] | None = None
        """shape-only counting: outputs of ops that have no meta kernel, by overload packet"""
        rules = policy.rules
        self._unit = float(rules.unit_bits)
        self._add_bits = policy.add_bits
        self._fixed = (rules.freebie.mult_bits, rules.freebie.other_bits) if policy.freebie else None
        self._attention_calls = _AttentionCalls(self)
        self._watching = False
        """whether the attention function mode is on the stack"""
        self._fast_paths = 0
        """fast-path modules running (the function mode steps aside while any runs)"""
        self._entered = False
        self.memo: PricingMemo | None = None
        """priced references of pricing hints, kept across forwards by the Counter (see :meth:`hint`)"""

    def __enter__(self) -> CountingMode:
        self._entered = True
        self._watch(True)
        try:
            entered = super().__enter__()
        except BaseException:
            self._watch(False)
            raise
        LISTENERS.append(self)
        return entered

    def __exit__(self, *exc: Any) -> None:
        self._entered = False
        if self in LISTENERS:
            LISTENERS.remove(self)
        try:
            super().__exit__(*exc)
        finally:
            self._watch(False)

    def declare_width(self, tensor: torch.Tensor, bits: int) -> None:
        """:func:`micronet_score.hints.stored_at`: the tensor holds b-bit values."""
        if tensor.is_nested:
            return
        if not 1 <= bits <= 64:
            raise CountingBug(f"stored_at: a width of {bits} bits (1-64)")
        self.policy.check_freebie(bits, "a value declared stored_at")
        self.marks.set(tensor, bits)

    def _region(self, func: Any, args: tuple, out: Any) -> None:
        """A record_function region opens (a row under the running module) or closes (regions nest: the last
        opened closes first)."""
        if func in _REGION_ENTER:
            name = str(args[0]) if args else "region"
            path = f"{self.stack[-1]}.{name}" if self.stack and self.stack[-1] else name
            self.stack.append(path)
            self.regions.append(path)
        elif self.regions:
            path = self.regions.pop()
            if path in self.stack:
                del self.stack[len(self.stack) - 1 - self.stack[::-1].index(path)]

    def _watch(self, on: bool) -> None:
        if on and not self._watching:
            self._attention_calls.__enter__()
        elif not on and self._watching:
            self._attention_calls.__exit__(None, None, None)
        self._watching = on

    # --- dispatch -----------------------------------------------------------------------------------------

    def _run(self, func: Any, args: tuple, kwargs: dict) -> Any:
        try:
            out = None
            if self.meta_fast is not None:  # shape-only: outputs made directly where torch's meta kernel is slow
                fast = self.meta_fast.get(func)
                if fast is not None:
                    out = fast(args, kwargs)
            if out is None:
                out = func(*args, **kwargs)
        except NotImplementedError:
            fallback = self.meta_fallbacks.get(func.overloadpacket) if self.meta_fallbacks else None
            if fallback is None:
                raise
            out = fallback(args, kwargs)  # shape-only: an op without a meta kernel, its output shapes known
        return out

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if kwargs is None:
            kwargs = {}
        out = self._run(func, args, kwargs)
        if func in _REGIONS:
            self._region(func, args, out)
            return out
        if _in_backward() != -1:
            self.backward_ops += 1
            return out
        try:
            handler, flow = _RESOLVED[func]
        except KeyError:
            handler, flow = resolve(func)
        if self.watch:
            self._taken(args)
        if (handler is None and flow is None) or self.quiet:
            return out
        if self.converting:
            # Inside a quantizer: a format conversion, free; the scales it reads are stored values. Data movement
            # (a width flow and no price) changes no format.
            for arg in args:
                self.touch(arg)
            if handler is not None:
                self.tally.conversions += 1
            return out
        if handler is not None:
            self.facts.dots.clear()
            charge = handler(Op(func, args, kwargs, out, self.facts), self.prices)
            if charge is not None:
                self.apply(func, args, charge, out)
        if flow is not None:
            self.flow(flow, args, out)
        return out

    def _taken(self, args: tuple) -> None:
        for arg in args:
            for tensor in arg if isinstance(arg, (list, tuple)) else (arg,):
                if isinstance(tensor, torch.Tensor) and not tensor.is_nested:
                    key = storage_key(tensor)
                    if key in self.watch:
                        self.watch.discard(key)
                        self.read.add(key)

    def _run_unpriced(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """Runs a fused call with the aten ops beneath it unpriced (its caller prices the call as a whole)."""
        fast = self.meta_fast.get(func) if self.meta_fast is not None else None  # shape-only: its output directly
        out = fast(args, kwargs) if fast is not None else None
        if out is not None:
            if self.watch:
                self._taken(args)  # what the ops beneath would have taken
            return out
        self.quiet += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self.quiet -= 1
        self.facts.dots.clear()
        return out

    def hint(self, fast: Any, reference: Any, tensors: list[torch.Tensor], key: Any = None) -> Any:
        """A pricing hint (:mod:`hints`): ``fast()`` runs outside the counting modes (unpriced, at plain speed)
        and gives the result; ``reference(copies)`` runs on meta copies of ``tensors`` and is priced. Each copy
        stands for its tensor (the same stored width and representation, or the same mark; a stored tensor is
        read for inference where the reference reads its stand-in); the result takes the reference's marks.

        ``key``: what else the reference's ops depend on (the hint's non-tensor arguments, modes). With a
        :attr:`memo`, a reference priced once for the same key, tensor layouts and widths, and place in the model
        is not run again: its charges are added as they were (what it sees are meta copies, so its count is a
        function of exactly these)."""
        memo_key = self._memo_key(key, tensors) if key is not None and self.memo is not None else None
        priced = self.memo.entries.get(memo_key) if memo_key is not None else None
        if priced is not None:
            out = _outside_modes(fast)
            priced.replay(self, flat_tensors(out))
            return out
        copies = self._run_unpriced(
            lambda: [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta") for t in tensors], (), {})
        stand_ins = {}  # the stand-ins of stored tensors: copy's storage -> the tensor's
        for real, copy in zip(tensors, copies, strict=True):
            self.copied(real, copy)
            info = self.weights.get(storage_key(real))
            if info is not None:
                stand_ins[storage_key(copy)] = storage_key(real), info.is_parameter
        watched = {c for c, (real, is_parameter) in stand_ins.items() if is_parameter and real in self.watch}
        self.watch |= watched  # an op that takes a parameter's stand-in takes the parameter
        out = _outside_modes(fast)
        outer = self.tally, self.dot_uses, len(self.norms), len(self.dropped)
        self.tally, self.dot_uses = Tally(), {}
        shortcuts, self.meta_fast = self.meta_fast, self.meta_fast or META_FAST
        try:
            priced = reference(copies)
        finally:
            self.meta_fast = shortcuts
            self.watch -= watched
            read = {real for copy, (real, _) in stand_ins.items() if copy in self.read}
            inner = PricedCall(self.tally, self.dot_uses, read)
            self.tally, self.dot_uses = outer[0], outer[1]
            inner.add_to(self)
        got, want = flat_tensors(out), flat_tensors(priced)
        if [(t.shape, t.dtype) for t in got] != [(t.shape, t.dtype) for t in want]:
            raise CountingBug(f"internal error: a pricing hint's fast computation gave {[tuple(t.shape) for t in got]}"
                              f" but its reference {[tuple(t.shape) for t in want]}; please report it")
        for real, copy in zip(got, want):
            self.copied(copy, real)
        if memo_key is not None and (len(self.norms), len(self.dropped)) == outer[2:]:
            inner.outputs = [self._pricing_identity(t) for t in got]
            if _UNKNOWN not in inner.outputs:
                self.memo.keep(memo_key, inner)
        return out

    def _pricing_identity(self, tensor: torch.Tensor) -> Any:
        """What a priced op can know of a tensor besides its layout: a stored tensor of the weight table (its
        info), a mark, or nothing (None); _UNKNOWN where it is something no memo entry may stand for (a derived
        stored tensor of this forward, a nested tensor)."""
        if tensor.is_nested:
            return _UNKNOWN
        key = storage_key(tensor)
        info = self.weights.get(key) or self.derived.get(key)
        if info is not None:
            return info if id(info) in self.memo.stored else _UNKNOWN
        return self.marks.get(tensor) if self.marks.used else None

    def _memo_key(self, key: Any, tensors: list[torch.Tensor]) -> Any:
        facts = []
        for t in tensors:
            identity = self._pricing_identity(t)
            if identity is _UNKNOWN:
                return None
            facts.append((t.shape, t.stride(), t.dtype, id(identity) if isinstance(identity, TensorInfo) else identity))
        place = (tuple(self.stack), tuple(self.regions), self.converting, self.quiet, self._fast_paths, self._watching)
        return key, tuple(facts), place

    def attention(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, ...): one price, any kernel."""
        if self.quiet or self.converting or not all(isinstance(t, torch.Tensor) for t in args[:3]):
            return func(*args, **kwargs)
        q, k, v = args[:3]
        if q.is_nested or q.dim() < 2:
            return func(*args, **kwargs)  # priced by the kernel that runs it
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
        out = self._run_unpriced(func, args, kwargs)
        self.apply(func, args, attention_charge(q, k, v, mask is not None or bool(causal), self.prices), out)
        return out

    def multi_head_attention(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """F.multi_head_attention_forward (nn.MultiheadAttention off its fast path): priced as the fast path's
        fused op is (projections, one attention per head and sequence, output projection)."""
        call = _MHA_SIGNATURE.bind(*args, **kwargs)
        call.apply_defaults()
        a = call.arguments
        q, k, v = a["query"], a["key"], a["value"]
        plain = a["bias_k"] is None and not a["add_zero_attn"] and a["static_k"] is None and a["static_v"] is None
        if self.quiet or self.converting or not plain or q.is_nested or q.dim() not in (2, 3):
            return func(*args, **kwargs)
        out = self._run_unpriced(func, args, kwargs)
        same = a["query"] is a["key"] and a["key"] is a["value"]
        if q.dim() == 3:  # (length, batch, embed) -> (batch, length, embed): shapes only
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        if same:
            k = v = q
        weight = a["q_proj_weight"] if a["use_separate_proj_weight"] else a["in_proj_weight"]
        masked = a["key_padding_mask"] is not None or a["attn_mask"] is not None or bool(a["is_causal"])
        averaged = bool(a["need_weights"]) and bool(a["average_attn_weights"])
        bill = mha_bill(self.prices, self.facts, q, k, v, q.shape[-1], a["num_heads"], weight,
                        a["out_proj_weight"], masked, averaged)
        self.apply(func, args, Charge(bill, (q, weight)), out)
        return out

    # --- module attribution -------------------------------------------------------------------------------

    def enter(self, module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, _FAST_PATHS) and (self._fast_paths or _may_take_fast_path(module)):
            if not self._fast_paths:
                self._watch(False)
            self._fast_paths += 1
        key = id(module)
        path = self.names.get(key)
        if path is None:
            return
        if not self.stack and self.first_input is None and args:
            self.first_input = args[0]
        self.stack.append(path)
        if key in self.output_bits:
            self.converting += 1

    def leave(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if isinstance(module, _FAST_PATHS) and self._fast_paths:
            self._fast_paths -= 1
            if not self._fast_paths and self._entered:
                self._watch(True)
        key = id(module)
        if self.names.get(key) is None or not self.stack:
            return
        self.stack.pop()
        width = self.output_bits.get(key)
        if width is not None:
            self.converting -= 1
            self.policy.check_freebie(width, lambda: f"the output_bits of module {self.names[key]!r}")
            for tensor in flat_tensors(output):
                self.marks.set(tensor, width)

    # --- charges ------------------------------------------------------------------------------------------

    def apply(self, func: Any, args: tuple, charge: Charge, out: Any) -> None:
        """Tally a handler's charge and record what it tells the storage accounting."""
        if charge.unpriced is not None:
            self.unpriced(charge.unpriced, out)
            return
        if charge.pruned:
            info = self.facts.pruned_info(args)
            if info is not None:
                self.derive(out, info)
            return
        if charge.bill:
            self.record(func, charge.bill, charge.operands)
        if charge.more is not None:
            self.apply(func, args, charge.more, out)
        if charge.linear:
            self.facts.linear = out
        if charge.quantized is not None:
            self.policy.check_freebie(charge.quantized, "a fake-quantized tensor")
            self.marks.set(flat_tensors(out)[0], charge.quantized)
            self.tally.conversions += 1
        self.tally.conversions += charge.conversions
        if charge.norm is not None:
            self.batch_norm(charge.norm.channels, charge.norm.folded, charge.norm.tensors)
        if charge.dropped:
            self.dropped.update(storage_key(t) for t in charge.dropped if isinstance(t, torch.Tensor))

    def width(self, tensor: torch.Tensor) -> int:
        """Width of an operand: a stored tensor's width, a quantizer's mark, a quantized dtype's width, the
        declared activation width, else a narrow float dtype's width (fp16, bf16), else the default."""
        if tensor.is_nested:
            return self.policy.activation_of(tensor.dtype)
        key = tensor.untyped_storage()._cdata  # storage_key, inlined: this runs for every operand of every op
        info = self.weights.get(key) or self.derived.get(key)
        if info is not None:
            self.read.add(key)
            return info.bits
        width = self.marks.get(tensor) if self.marks.used else None
        if width is None:
            width = QUANTIZED.get(tensor.dtype)
        return self.policy.activation_of(tensor.dtype) if width is None else width

    def stored_width(self, tensor: torch.Tensor) -> int | None:
        """Width of a stored tensor, or of a marked or quantized-dtype value; None for an unknown activation."""
        key = storage_key(tensor)
        info = self.weights.get(key) or self.derived.get(key)
        if info is not None:
            self.read.add(key)
            return info.bits
        mark = self.marks.get(tensor) if self.marks.used else None
        return mark if mark is not None else QUANTIZED.get(tensor.dtype)

    def record(self, func: Any, bill: Bill, operands: Any) -> None:
        """Charge a bill: mults and others at the largest operand width (operands: tensors, or known widths as
        ints), adds at the accumulator width. A negative count is a bug: it stops the count, naming op and
        module."""
        if self._fixed is not None:  # the freebie: fixed widths, refused where an operand is quantized below them
            mult_bits, other_bits = self._fixed
            for t in operands:
                if isinstance(t, torch.Tensor):
                    self.policy.check_freebie(self.width(t), lambda t=t: f"an operand of {func.namespace}."
                                              f"{func.overloadpacket.__name__} (dtype {t.dtype})")
        else:
            widest = None  # max(widths, default=activation), without a generator on every op
            for t in operands:
                if t is None:
                    continue
                w = self.width(t) if isinstance(t, torch.Tensor) else t
                if widest is None or w > widest:
                    widest = w
            mult_bits = other_bits = self.policy.activation if widest is None else widest
        path = self.stack[-1] if self.stack else ""
        for info, terms, outputs in self.facts.dots:  # the weights' dense dot products (see storage.settle)
            uses = self.dot_uses.setdefault(id(info), (info, {}))[1]
            key = (path, mult_bits, other_bits, terms)
            uses[key] = uses.get(key, 0.0) + outputs
        self.facts.dots.clear()
        tally = self.tally
        row = tally.rows.get(path)
        if row is None:
            row = tally.rows[path] = Counts()
        unit, add_bits = self._unit, self._add_bits
        for family, counts in bill:
            if counts is None:
                self.unpriced(f"{func.namespace}.{func.overloadpacket.__name__} ({family}: no price in the rule set)",
                              None)
                continue
            mults, adds, others = counts
            if mults < 0 or adds < 0 or others < 0:
                raise CountingBug(
                    f"internal error: {func.namespace}.{func.overloadpacket.__name__} in module {path or '<root>'} "
                    f"gave a negative count ({family}: mults={mults:g}, adds={adds:g}, others={others:g}); "
                    "please report it"
                )
            flops = (mults * mult_bits + adds * add_bits + others * other_bits) / unit
            row.mults += mults
            row.adds += adds
            row.others += others
            row.flops += flops
            fam = tally.families.get(family)
            if fam is None:
                fam = tally.families[family] = FamilyCounts()
            fam.calls += 1
            fam.mults += mults
            fam.adds += adds
            fam.others += others
            fam.flops += flops

    def unpriced(self, name: str, out: Any) -> None:
        """An op the rule set does not price: listed with its module, calls and output elements."""
        path = self.stack[-1] if self.stack else ""
        op = self.tally.uncounted.get((name, path))
        if op is None:
            op = self.tally.uncounted[(name, path)] = Uncounted()
        op.calls += 1
        op.elements += _elements(out)

    def batch_norm(self, channels: int, folded: bool, tensors: tuple) -> None:
        path = self.stack[-1] if self.stack else ""
        keys = tuple(storage_key(t) for t in tensors if isinstance(t, torch.Tensor))
        weight = tensors[0]
        info = self.weights.get(storage_key(weight)) if isinstance(weight, torch.Tensor) else None
        bits = info.bits if info is not None else self.policy.stored([], True)
        self.norms[path] = FoldedNorm(path, channels, folded, bits, keys)

    def derive(self, out: Any, info: TensorInfo) -> None:
        """``out`` holds a stored tensor's values (a copy, a pruned product): its width and representation."""
        self.derived[storage_key(out)] = info
        self._alive.append(out)

    # --- width flow -----------------------------------------------------------------------------------------

    def touch(self, tensor: Any) -> None:
        """A stored tensor (or a pricing hint's stand-in for one) read as a Python number (a quantizer's scale): it
        is needed for inference."""
        if isinstance(tensor, torch.Tensor) and not tensor.is_nested:
            key = storage_key(tensor)
            if key in self.weights or key in self.derived:
                self.read.add(key)

    def flow(self, flow: Flow, args: tuple, out: Any) -> None:
        """Widths that reach the output of a data-moving or value-picking op (the table in :mod:`flow`)."""
        source = args[0] if args and isinstance(args[0], torch.Tensor) and not args[0].is_nested else None
        if flow is Flow.SCALAR:
            self.touch(source)
        elif flow is Flow.COPY:
            self.copied(source, out)
        elif flow is Flow.LOOKUP:
            width = self.stored_width(source) if source is not None else None
            if width is not None:
                self._mark(out, width)
        elif not self.marks.used:
            return
        elif flow is Flow.MOVE:
            mark = self.marks.get(source) if source is not None else None
            if mark is not None:
                self._mark(out, mark)
        elif flow is Flow.JOIN:
            self._widest_mark(args[0], out)
        elif flow is Flow.PICK:
            self._widest_mark([a for a in args if isinstance(a, torch.Tensor)], flat_tensors(out)[:1])

    def _mark(self, out: Any, width: int) -> None:
        for tensor in flat_tensors(out):
            self.marks.set(tensor, width)

    def _widest_mark(self, sources: Any, out: Any) -> None:
        """Joins of marked values and values picked among marked ones keep the widest mark (any unmarked: none)."""
        width = 0
        for source in sources:
            mark = self.marks.get(source) if isinstance(source, torch.Tensor) else None
            if mark is None:
                return
            width = max(width, mark)
        if width:
            self._mark(out, width)

    def copied(self, source: Any, out: Any) -> None:
        """A copy of a stored tensor is still that tensor (its representation; its width, or a narrower float dtype's
        when the copy casts to one, as autocast does); of a marked one, marked."""
        if source is None or not isinstance(out, torch.Tensor) or out.is_nested:
            return
        key = storage_key(source)
        info = self.weights.get(key) or self.derived.get(key)
        if info is not None:
            narrow = FLOAT_BITS.get(out.dtype) if out.dtype != source.dtype else None
            if narrow is not None and narrow < info.bits:
                info = TensorInfo(info.names, info.module, info.numel, narrow, info.is_parameter, info.nonzeros,
                                  info.known, source=info.source or info)
            self.derive(out, info)
        elif self.marks.used:
            mark = self.marks.get(source)
            if mark is not None:
                self.marks.set(out, mark)

    def finish(self) -> None:
        """Forget per-forward state (references that keep tensors alive, the module stack)."""
        self.stack.clear()
        self.regions.clear()
        self.converting = 0
        self.quiet = 0
        self._fast_paths = 0
        self._alive.clear()
        self.derived.clear()
        self.facts.linear = None
        self.first_input = None
        self.marks.clear()


def flat_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a value, in order, through nested tuples and lists."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in flat_tensors(o)]
    return []


def _outside_modes(run: Any) -> Any:
    """``run()`` with no dispatch or function mode active: a pricing hint's fast computation, at plain speed."""
    with torch._C.DisableTorchFunction(), _disable_current_modes():
        return run()
