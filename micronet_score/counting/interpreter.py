"""The counting interpreter: a TorchDispatchMode that prices every aten op of the real forward.

Module attribution comes from global forward pre/post hooks installed only while counting: every op is
charged to the innermost module of the model that is running. Widths of operands come from the weight table
(by storage), from fake-quantization marks, from a quantized dtype, or from the declared activation width. Marks
flow through ops that keep values on their grid (views, copies, lookups, joins, relu, max pooling); arithmetic
produces values of unknown width, which count at the declared activation width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from micronet_score.counting.bits import BitPolicy, Marks
from micronet_score.counting.costs import Bill, Prices
from micronet_score.counting.grid import QUANTIZED
from micronet_score.counting.ops import FREE, TABLE, Handler
from micronet_score.counting.packed import Packed
from micronet_score.counting.storage import FoldedNorm, TensorInfo, WeightTable, storage_key

_in_backward = torch._C._current_graph_task_id
"""-1 outside autograd's backward pass; the id of the graph task while it runs (on any thread)."""

_HANDLERS: dict[Any, Handler | None] = {}
"""aten OpOverload -> handler (None: free), filled on first sight of each overload."""


def _unpriced_handler(name: str) -> Handler:
    def handler(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
        ctx.unpriced(name, out)

    return handler


def resolve(func: Any) -> Handler | None:
    """The handler of an aten overload: its packet's entry in the table, free, or unpriced (never silent)."""
    packet = func.overloadpacket
    handler = TABLE.get(packet)
    if handler is None and packet not in FREE:
        handler = _unpriced_handler(f"aten.{packet.__name__}")
    _HANDLERS[func] = handler
    return handler


def _elements(out: Any) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel()
    if isinstance(out, (tuple, list)):
        return sum(_elements(o) for o in out)
    return 0


class Tally:
    """Raw counts and 32-bit-equivalent flops, per module path and per op family; uncounted ops."""

    def __init__(self) -> None:
        self.rows: dict[str, list[float]] = {}
        self.families: dict[str, list[float]] = {}
        self.uncounted: dict[tuple[str, str], list[int]] = {}
        self.conversions = 0

    def merge(self, other: Tally) -> None:
        for mine, theirs in ((self.rows, other.rows), (self.families, other.families)):
            for key, values in theirs.items():
                row = mine.setdefault(key, [0.0] * len(values))
                for i, v in enumerate(values):
                    row[i] += v
        for key, (calls, elements) in other.uncounted.items():
            row = self.uncounted.setdefault(key, [0, 0])
            row[0] += calls
            row[1] += elements
        self.conversions += other.conversions


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
        self.converting = 0
        self.derived: dict[int, TensorInfo] = {}
        self._alive: list[torch.Tensor] = []
        self.last_linear: torch.Tensor | None = None
        self.norms: dict[str, FoldedNorm] = {}
        self.dropped: set[int] = set()
        self.read: set[int] = set()
        self.first_input: Any = None
        self.first_input_seen: Any = None
        """first_input as it was when the forward ended (finish() forgets first_input)"""
        self.op: Any = None
        self.backward_ops = 0
        """ops run by autograd's backward pass while counting: training work, never counted"""
        self.meta_fallbacks: dict[Any, Any] | None = None
        self.meta_fast: dict[Any, Any] | None = None
        """shape-only counting: outputs of ops that have no meta kernel, by overload packet"""
        rules = policy.rules
        self.keep_layer_norm_affine = rules.folding.layer_norm_affine == "keep"
        self._fold_bn = rules.folding.batch_norm_after_linear == "bias"
        self._unit = float(rules.unit_bits)
        self._add_bits = policy.add_bits
        self._fixed = (rules.freebie.mult_bits, rules.freebie.other_bits) if policy.freebie else None

    # --- dispatch -----------------------------------------------------------------------------------------

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if kwargs is None:
            kwargs = {}
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
        if _in_backward() != -1:
            self.backward_ops += 1
            return out
        try:
            handler = _HANDLERS[func]
        except KeyError:
            handler = resolve(func)
        if handler is None:
            return out
        if self.converting:
            # Inside a quantizer: a format conversion, free; the scales it reads are stored values.
            for arg in args:
                self.touch(arg)
            if not _is_move(handler):
                self.tally.conversions += 1
            return out
        self.op = func
        handler(self, args, kwargs, out)
        return out

    # --- module attribution -------------------------------------------------------------------------------

    def enter(self, module: torch.nn.Module, args: tuple) -> None:
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
        key = id(module)
        if self.names.get(key) is None or not self.stack:
            return
        self.stack.pop()
        width = self.output_bits.get(key)
        if width is not None:
            self.converting -= 1
            self.policy.check_freebie(width, f"the output_bits of module {self.names[key]!r}")
            for tensor in _flat(output):
                self.marks.set(tensor, width)

    # --- what handlers call -------------------------------------------------------------------------------

    def width(self, tensor: torch.Tensor) -> int:
        """Width of an operand: a stored tensor's width, a quantizer's mark, a quantized dtype's width, else the
        declared activation width."""
        key = tensor.untyped_storage()._cdata  # storage_key, inlined: this runs for every operand of every op
        info = self.weights.get(key) or self.derived.get(key)
        if info is not None:
            self.read.add(key)
            return info.bits
        width = self.marks.get(tensor) if self.marks.used else None
        if width is None:
            width = QUANTIZED.get(tensor.dtype)
        return self.policy.activation if width is None else width

    def stored_width(self, tensor: torch.Tensor) -> int | None:
        """Width of a stored tensor, or of a marked or quantized-dtype value; None for an unknown activation."""
        key = storage_key(tensor)
        info = self.weights.get(key) or self.derived.get(key)
        if info is not None:
            self.read.add(key)
            return info.bits
        mark = self.marks.get(tensor) if self.marks.used else None
        return mark if mark is not None else QUANTIZED.get(tensor.dtype)

    def keep(self, source: torch.Tensor, out: Any) -> None:
        """Ops that keep values on their grid (lookups, joins, relu, max): the output has the source's width."""
        width = self.stored_width(source)
        if width is not None:
            for tensor in _flat(out):
                self.marks.set(tensor, width)

    def keep_marked(self, sources: Any, out: Any) -> None:
        """Outputs of relu, max pooling and joins of marked values keep the widest mark (any unmarked: none)."""
        if not self.marks.used:
            return
        width = 0
        for source in sources:
            mark = self.marks.get(source) if isinstance(source, torch.Tensor) else None
            if mark is None:
                return
            width = max(width, mark)
        if width:
            for tensor in _flat(out):
                self.marks.set(tensor, width)

    def touch(self, tensor: Any) -> None:
        """A stored tensor read as a Python number (a quantizer's scale): it is needed for inference."""
        if isinstance(tensor, torch.Tensor):
            key = storage_key(tensor)
            if key in self.weights:
                self.read.add(key)

    def packed(self) -> Packed | None:
        """The packed weight of the running torch.ao quantized module."""
        return self.table.packed.get(self.stack[-1]) if self.stack and self.table.packed else None

    def density(self, *operands: torch.Tensor) -> float:
        """Density of the stored (weight) operand of a dot product; activations are dense."""
        density = 1.0
        for tensor in operands:
            key = storage_key(tensor)
            info = self.weights.get(key) or self.derived.get(key)
            if info is not None and info.density < density:
                density = info.density
        return density

    def record(self, bill: Bill, operands: Any) -> None:
        """Charge a bill: mults and others at the largest operand width (operands: tensors, or known widths as
        ints), adds at the accumulator width."""
        if self._fixed is not None:
            mult_bits, other_bits = self._fixed
            for t in operands:
                if isinstance(t, torch.Tensor):
                    self.width(t)
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
        tally = self.tally
        row = tally.rows.get(path)
        if row is None:
            row = tally.rows[path] = [0.0, 0.0, 0.0, 0.0]
        unit, add_bits = self._unit, self._add_bits
        for family, counts in bill:
            if counts is None:
                self.unpriced(f"aten.{self.op.overloadpacket.__name__} ({family}: no price in the rule set)", None)
                continue
            mults, adds, others = counts
            flops = (mults * mult_bits + adds * add_bits + others * other_bits) / unit
            row[0] += mults
            row[1] += adds
            row[2] += others
            row[3] += flops
            fam = tally.families.get(family)
            if fam is None:
                fam = tally.families[family] = [0.0, 0.0, 0.0, 0.0, 0.0]
            fam[0] += 1
            fam[1] += mults
            fam[2] += adds
            fam[3] += others
            fam[4] += flops

    def unpriced(self, name: str, out: Any) -> None:
        """An op the rule set does not price: listed with its module, calls and output elements."""
        path = self.stack[-1] if self.stack else ""
        row = self.tally.uncounted.setdefault((name, path), [0, 0])
        row[0] += 1
        row[1] += _elements(out)

    def linear_output(self, out: torch.Tensor) -> None:
        self.last_linear = out

    def is_linear_output(self, tensor: Any) -> bool:
        return tensor is self.last_linear and tensor is not None

    def folds_into_linear(self, tensor: torch.Tensor) -> bool:
        """Batch norm folds (rule set permitting) when its input is the output of the last conv/linear."""
        return self._fold_bn and self.is_linear_output(tensor)

    def batch_norm(self, x: torch.Tensor, channels: int, folded: bool, tensors: tuple) -> None:
        path = self.stack[-1] if self.stack else ""
        keys = tuple(storage_key(t) for t in tensors if isinstance(t, torch.Tensor))
        weight = tensors[0]
        info = self.weights.get(storage_key(weight)) if isinstance(weight, torch.Tensor) else None
        bits = info.bits if info is not None else self.policy.stored([], True)
        self.norms[path] = FoldedNorm(path, channels, folded, bits, keys)

    def drop(self, *tensors: Any) -> None:
        """Stored tensors folded away by the rule set (their storage is not counted)."""
        self.dropped.update(storage_key(t) for t in tensors if isinstance(t, torch.Tensor))

    def prune_product(self, args: tuple, out: torch.Tensor) -> bool:
        """``weight_orig * weight_mask`` of torch.nn.utils.prune: the product is the weight, not inference work."""
        if not self.table.pruned or len(args) < 2 or not isinstance(args[1], torch.Tensor):
            return False
        pruned = self.table.pruned.get((storage_key(args[0]), storage_key(args[1])))
        if pruned is None:
            pruned = self.table.pruned.get((storage_key(args[1]), storage_key(args[0])))
        if pruned is None:
            return False
        self.derived[storage_key(out)] = pruned.info
        self._alive.append(out)
        return True

    def quantized(self, out: Any, width: int) -> None:
        """A fake quantizer's output holds values of its integer range's width; the rounding is a conversion."""
        self.policy.check_freebie(width, "a fake-quantized tensor")
        self.marks.set(out, width)
        self.tally.conversions += 1

    def moved(self, args: tuple, out: Any) -> None:
        """Data movement keeps the width of what it moves."""
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        mark = self.marks.get(source) if source is not None else None
        if mark is not None:
            for tensor in _flat(out):
                self.marks.set(tensor, mark)

    def copied(self, source: Any, out: Any) -> None:
        """A copy of a stored tensor is still that tensor (its width and density); of a marked one, marked."""
        if not isinstance(source, torch.Tensor) or not isinstance(out, torch.Tensor):
            return
        key = storage_key(source)
        info = self.weights.get(key) or self.derived.get(key)
        if info is not None:
            self.derived[storage_key(out)] = info
            self._alive.append(out)
        elif self.marks.used:
            self.moved((source,), out)

    def finish(self) -> None:
        """Forget per-forward state (references that keep tensors alive, the module stack)."""
        self.stack.clear()
        self.converting = 0
        self._alive.clear()
        self.derived.clear()
        self.last_linear = None
        self.first_input = None
        self.marks.clear()


_DATA_MOVEMENT = frozenset({"_move", "_copy", "_keep", "_embedding", "_join", "_scalar"})


def _is_move(handler: Handler) -> bool:
    """Data movement (free and no conversion: copying b-bit values changes no format)."""
    return getattr(handler, "__name__", "") in _DATA_MOVEMENT


def _flat(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _flat(o)]
    return []
