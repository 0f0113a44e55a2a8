"""Storage accounting: every value needed for inference, by storage, at its bit-width, in its representation.

Rules (§1.3): each tensor is stored dense, as its nonzeros plus a bitmask of the full shape, or block-sparse
(see :mod:`representation`: the cheapest by its effect on the score, or the one the user forces); tied tensors
count once; parameters of modules that never ran and that no op read are not needed for inference: they are not
stored, and are listed by name; frozen parameters count; buffers count when the forward reads them (quantizer
scales, running statistics); batch norm folds per the rule set (``[folding]``; the values it stores per channel
are ``[storage]`` data, the widths of scales and zero points ``[quantization]``). ``torch.nn.utils.prune``
reparametrisations (and masks saved beside their weights as ``<name>_mask``) store the product
``weight_orig * weight_mask``, in its representation. Tensors of a narrow integer, quantized or float dtype count
at that width unless declared otherwise; the packed weights of torch.ao quantized modules count at their width,
with their scales, zero points and float bias.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from micronet_score.counting.bits import FLOAT_BITS, BitPolicy
from micronet_score.counting.bitviews import BIT_VIEWS, on_bits
from micronet_score.counting.blocks import Blocks
from micronet_score.counting.grid import DTYPE_BITS
from micronet_score.counting.packed import Packed, packed_modules
from micronet_score.counting.representation import Choice, Representation, Weights, block_options, choose, options


def storage_key(tensor: torch.Tensor) -> int:
    """Identity of a tensor's storage: views and tied tensors share it (meta tensors too)."""
    return tensor.untyped_storage()._cdata


@dataclass(slots=True)
class Walk:
    """One pass over a model: its modules (first path of each) and its parameters and buffers by every name
    (``named_parameters(remove_duplicate=False)`` order), without re-walking the module tree per question."""

    modules: dict[str, nn.Module]
    parameters: list[tuple[str, torch.Tensor]]
    buffers: list[tuple[str, torch.Tensor]]

    @classmethod
    def of(cls, model: nn.Module) -> Walk:
        modules: dict[str, nn.Module] = {}
        seen: set[int] = set()
        parameters: list[tuple[str, torch.Tensor]] = []
        buffers: list[tuple[str, torch.Tensor]] = []
        for path, module in model.named_modules(remove_duplicate=False):
            if id(module) not in seen:
                seen.add(id(module))
                modules[path] = module
            prefix = f"{path}." if path else ""
            for name, tensor in module._parameters.items():
                if tensor is not None:
                    parameters.append((prefix + name, tensor))
            for name, tensor in module._buffers.items():
                if tensor is not None:
                    buffers.append((prefix + name, tensor))
        return cls(modules, parameters, buffers)

    def keyed(self) -> dict[int, torch.Tensor]:
        """Storage key -> the first tensor of the model on that storage."""
        keyed: dict[int, torch.Tensor] = {}
        for _, tensor in self.parameters + self.buffers:
            keyed.setdefault(storage_key(tensor), tensor)
        return keyed

    def identity(self) -> list[tuple[str, torch.Tensor, int]]:
        """Names, tensors and storages of the model: when any differ, the weight table is rebuilt (the tensors
        are held, so that a freed tensor's id or storage address cannot come back as another's)."""
        return [(name, t, storage_key(t)) for name, t in self.parameters + self.buffers]


@dataclass(slots=True)
class TensorInfo:
    """A stored tensor of the model: where it lives, its width, its nonzeros and block tilings (from which its
    representation is chosen), and the dot products that read it."""

    names: list[str]
    module: str
    numel: int
    bits: int
    is_parameter: bool
    nonzeros: int
    known: bool = True
    read: bool = False
    version: int = -1
    blocks: list[Blocks] = field(default_factory=list)
    """block tilings worth pricing for this tensor (values with zeros, rule set permitting)"""
    uses: float = 0.0
    """32-bit-equivalent operations per sample of the dot products that read it, priced dense (last measure)"""
    source: TensorInfo | None = None
    """the stored tensor this is a narrower copy of (autocast): its dot products follow that tensor's choice"""

    def options(self, mask) -> list[Representation]:
        return options(self.numel, self.nonzeros, self.bits, mask, self.blocks)


@dataclass(slots=True)
class Pruned:
    """A masked weight: the forward multiplies ``orig`` by ``mask``; the product is the weight."""

    info: TensorInfo
    orig_key: int
    mask_key: int
    source: str = "prune"
    """"prune" (torch.nn.utils.prune: ``<name>_orig * <name>_mask``) or "mask" (``<name> * <name>_mask``)"""


@dataclass(slots=True)
class FoldedNorm:
    """A batch norm the interpreter saw: its channel count and whether it followed a conv/linear."""

    module: str
    channels: int
    folded: bool
    bits: int
    keys: tuple[int, ...]


@dataclass
class WeightTable:
    """The model's parameters and buffers by storage key, refreshed before each measurement."""

    by_key: dict[int, TensorInfo] = field(default_factory=dict)
    pruned: dict[tuple[int, int], Pruned] = field(default_factory=dict)
    packed: dict[str, Packed] = field(default_factory=dict)
    meta: bool = False
    policy: BitPolicy | None = None
    choice: Choice = "auto"

    @classmethod
    def of(cls, model: nn.Module, policy: BitPolicy, walk: Walk | None = None, choice: Choice = "auto") -> WeightTable:
        walk = walk or Walk.of(model)
        table = cls(policy=policy, choice=choice)
        first: dict[int, torch.Tensor] = {}
        for is_parameter, items in ((True, walk.parameters), (False, walk.buffers)):
            for name, tensor in items:
                key = storage_key(tensor)
                if key in table.by_key:
                    table.by_key[key].names.append(name)
                    continue
                first[key] = tensor
                table.by_key[key] = TensorInfo(
                    names=[name],
                    module=name.rpartition(".")[0],
                    numel=tensor.numel(),
                    bits=0,
                    is_parameter=is_parameter,
                    nonzeros=0,
                )
        for key, info in table.by_key.items():
            info.bits = policy.stored(info.names, info.is_parameter, native_bits(first[key]))
        for path, module in walk.modules.items():
            for base, orig, mask, source in mask_pairs(module):
                full = f"{path}.{base}" if path else base
                names = [full, f"{full}_orig"] if source == "prune" else [full]
                info = TensorInfo(
                    names=[full],
                    module=path,
                    numel=orig.numel(),
                    bits=policy.stored(names, True, native_bits(orig)),
                    is_parameter=True,
                    nonzeros=orig.numel(),
                )
                table.pruned[(storage_key(orig), storage_key(mask))] = Pruned(
                    info, storage_key(orig), storage_key(mask), source
                )
        table.packed = packed_modules(model, walk.modules)
        for packed in table.packed.values():
            policy.check_freebie(packed.bits, f"the packed weight of module {packed.module!r}")
        table.refresh(model, walk)
        return table

    def refresh(self, model: nn.Module, walk: Walk | None = None) -> None:
        """Recount nonzeros from the current values (a training loop may have pruned since)."""
        walk = walk or Walk.of(model)
        tensors = walk.keyed()
        self.meta = False
        stale: list[tuple[TensorInfo, torch.Tensor]] = []
        for key, info in self.by_key.items():
            tensor = tensors.get(key)
            info.read = False
            if tensor is None or tensor._version == info.version:
                self.meta |= not info.known
                continue
            info.version = tensor._version
            stale.append((info, tensor))
        for (info, tensor), (nonzeros, known) in zip(stale, count_nonzeros([t for _, t in stale]), strict=True):
            info.nonzeros, info.known = nonzeros, known
            info.blocks = self._blocks(tensor, info)
            self.meta |= not known
        for pruned in self.pruned.values():
            orig, mask = tensors.get(pruned.orig_key), tensors.get(pruned.mask_key)
            if orig is None or mask is None:
                continue
            nonzeros, known = (
                count_nonzero(orig.detach() * mask.detach())
                if orig.device.type != "meta"
                else (
                    orig.numel(),
                    False,
                )
            )
            pruned.info.nonzeros, pruned.info.known = nonzeros, known
            if known and nonzeros < pruned.info.numel:
                with torch.no_grad():
                    pruned.info.blocks = self._blocks(orig.detach() * mask.detach(), pruned.info)
            self.meta |= not known

    def _blocks(self, values: torch.Tensor, info: TensorInfo) -> list[Blocks]:
        if self.policy is None or not info.known or info.nonzeros >= info.numel:
            return []
        return block_options(values, info.nonzeros, info.bits, self.policy.rules.mask, choice=self.choice)

    def pruned_keys(self) -> set[int]:
        return {k for p in self.pruned.values() for k in (p.orig_key, p.mask_key)}


def native_bits(tensor: torch.Tensor) -> int | None:
    """Width a tensor's integer, quantized or non-default float dtype gives its values (fp16: 16, fp64: 64; None
    for fp32 and wide integer dtypes)."""
    if tensor.is_floating_point():
        return FLOAT_BITS.get(tensor.dtype)
    return DTYPE_BITS.get(tensor.dtype)


def mask_pairs(module: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor, str]]:
    """Masks beside a module's own tensors: (name, tensor, mask, source) for ``<name>_orig`` + ``<name>_mask``
    (torch.nn.utils.prune) and ``<name>`` + ``<name>_mask`` (a mask saved beside its weight)."""
    own = {name: t for name, t in module._parameters.items() if t is not None}
    own.update((name, t) for name, t in module._buffers.items() if t is not None)
    pairs = []
    for name, mask in own.items():
        if not name.endswith("_mask") or not isinstance(mask, torch.Tensor):
            continue
        base = name[: -len("_mask")]
        if f"{base}_orig" in own:
            pairs.append((base, own[f"{base}_orig"], mask, "prune"))
        elif base in own and own[base].shape == mask.shape:
            pairs.append((base, own[base], mask, "mask"))
    return pairs


_UNSIGNED = {np.dtype(np.int16): np.uint16, np.dtype(np.int32): np.uint32, np.dtype(np.int64): np.uint64}

_CHUNK = 1 << 16
"""Elements per pass of the shift-and-count (a buffer that stays in cache)."""


_SMALL = 1 << 14
"""Tensors up to this size are counted together, one pass per dtype (a model has hundreds of small ones)."""


def count_nonzeros(tensors: list[torch.Tensor]) -> list[tuple[int, bool]]:
    """:func:`count_nonzero` of each tensor; the small CPU float ones in one concatenated pass per dtype."""
    results: list[tuple[int, bool] | None] = [None] * len(tensors)
    small: dict[torch.dtype, list[tuple[int, torch.Tensor]]] = {}
    with torch.no_grad():
        for i, tensor in enumerate(tensors):
            t = tensor.detach()
            if 0 < t.numel() <= _SMALL and on_bits(t):
                small.setdefault(t.dtype, []).append((i, t))
            else:
                results[i] = count_nonzero(t)
        for dtype, items in small.items():
            if len(items) == 1:
                results[items[0][0]] = count_nonzero(items[0][1])
                continue
            view, shift = BIT_VIEWS[dtype]
            values = torch.cat([t.reshape(-1) for _, t in items]).view(view).numpy()
            sizes = np.fromiter((t.numel() for _, t in items), dtype=np.int64, count=len(items))
            offsets = np.concatenate(([0], np.cumsum(sizes)[:-1]))
            counts = np.add.reduceat(((values << 1) if shift else values) != 0, offsets, dtype=np.int64)
            for (i, _), n in zip(items, counts.tolist(), strict=True):
                results[i] = (n, True)
    return results  # type: ignore[return-value]


def count_nonzero(tensor: torch.Tensor) -> tuple[int, bool]:
    """Nonzeros of a tensor and whether they are known (meta tensors have no values: counted dense).

    Contiguous CPU floats are counted on their bits a chunk at a time (about 5x faster than
    ``torch.count_nonzero`` on float32, single thread); -0.0 counts as zero, NaN as nonzero."""
    if tensor.device.type == "meta":
        return tensor.numel(), False
    with torch.no_grad():
        t = tensor.detach()
        if not on_bits(t):
            return int(torch.count_nonzero(t)), True
        view, shift = BIT_VIEWS[t.dtype]
        values = t.view(view).reshape(-1).numpy()
        if not shift:
            return int(np.count_nonzero(values)), True
        if values.size <= _CHUNK:
            return int(np.count_nonzero(values << 1)), True
        # A chunk without zeros is proven so by two fast reductions: -0.0 is the most negative signed
        # pattern and +0.0 the smallest unsigned one; only a chunk holding either is counted element-wise.
        unsigned = values.view(_UNSIGNED[values.dtype])
        negative_zero = np.iinfo(values.dtype).min
        buffer = np.empty(_CHUNK, dtype=values.dtype)
        total = 0
        for start in range(0, values.size, _CHUNK):
            chunk = values[start : start + _CHUNK]
            if chunk.min() != negative_zero and unsigned[start : start + _CHUNK].min() != 0:
                total += chunk.size
                continue
            out = buffer[: chunk.size]
            np.left_shift(chunk, 1, out=out)
            total += int(np.count_nonzero(out))
        return total, True


@dataclass(slots=True)
class Stored:
    """32-bit-equivalent storage of one module row."""

    params: int = 0
    nonzeros: int = 0
    storage: float = 0.0
    bits: int | None = None
    representations: list[str] = field(default_factory=list)

    @property
    def representation(self) -> str | None:
        """The representation of its tensors: one label, or ``+``-joined when they differ."""
        return "+".join(dict.fromkeys(self.representations)) or None


@dataclass(slots=True)
class StoredTensor:
    """One stored tensor: its values, width, representation and 32-bit-equivalent storage."""

    name: str
    module: str
    numel: int
    nonzeros: int
    bits: int
    representation: str
    storage: float


@dataclass(slots=True)
class Storage:
    """The storage of a model: per module row, per tensor, and the parameters left out (never needed)."""

    rows: dict[str, Stored]
    tensors: list[StoredTensor]
    unused: list[str]


def account(
    table: WeightTable,
    norms: list[FoldedNorm],
    dropped: set[int],
    policy: BitPolicy,
    weights: Weights = Weights(),
    ran: set[str] | None = None,
) -> Storage:
    """Storage per module path and per tensor: each tensor in its representation (values * bits + mask bits),
    divided by the unit width. ``ran``: the module paths whose forward ran (None: unknown, every parameter is
    stored); a parameter no op read whose modules all never ran is not stored."""
    rules = policy.rules
    unit = float(rules.unit_bits)
    rows: dict[str, Stored] = {}
    tensors: list[StoredTensor] = []

    def add(name: str, module: str, numel: int, nonzeros: int, bits: int, shape: Representation) -> None:
        row = rows.setdefault(module, Stored())
        storage = shape.bits(bits) / unit
        row.params += numel
        row.nonzeros += nonzeros
        row.storage += storage
        row.bits = bits if row.bits is None else max(row.bits, bits)
        row.representations.append(shape.label)
        tensors.append(StoredTensor(name, module, numel, nonzeros, bits, shape.label, storage))

    def store(name: str, module: str, numel: int, nonzeros: int, bits: int, sparse: bool = False) -> None:
        """A value that is not a tensor of the table: dense, or (packed weights) masked when it has zeros."""
        found = options(numel, nonzeros, bits, rules.mask, [])
        add(name, module, numel, nonzeros, bits, found[-1] if sparse else found[0])

    def choose_for(info: TensorInfo) -> Representation:
        return choose(info.options(rules.mask), info.bits, unit, table.choice, weights, info.uses)

    skip = set(dropped) | table.pruned_keys()
    seen_norms: set[str] = set()
    for norm in norms:
        skip.update(norm.keys)
        if norm.module in seen_norms:
            continue
        seen_norms.add(norm.module)
        folding = rules.folding.batch_norm_after_linear if norm.folded else rules.folding.batch_norm_elsewhere
        values = norm.channels * rules.storage.batch_norm_values[folding]
        store(f"{norm.module} (batch norm: {folding})", norm.module, values, values, norm.bits)
    unused: list[str] = []
    for key, info in table.by_key.items():
        if key in skip or not (info.is_parameter or info.read):
            continue
        if ran is not None and info.is_parameter and not info.read and not _ran(info, ran):
            unused += info.names
            continue
        add(info.names[0], info.module, info.numel, info.nonzeros, info.bits, choose_for(info))
    for pruned in table.pruned.values():
        info = pruned.info
        add(info.names[0], info.module, info.numel, info.nonzeros, info.bits, choose_for(info))
    for packed in table.packed.values():
        # a packed weight's dot products are priced at its nonzeros (ops.py): stored masked when it has zeros
        store(f"{packed.module}.weight", packed.module, packed.numel, packed.nonzeros, packed.bits, sparse=True)
        scale_bits, zero_bits = policy.scale_bits, policy.zero_point_bits(packed.bits)
        store(f"{packed.module}.scales", packed.module, packed.scales, packed.scales, scale_bits)
        store(f"{packed.module}.zero_points", packed.module, packed.scales, packed.scales, zero_bits)
        if packed.static:  # output scale and zero point (the requantization of the output)
            store(f"{packed.module}.output_scale", packed.module, 1, 1, scale_bits)
            store(f"{packed.module}.output_zero_point", packed.module, 1, 1, zero_bits)
        if packed.bias is not None:
            nonzeros, _ = count_nonzero(packed.bias)
            name = f"{packed.module}.bias"
            store(name, packed.module, packed.bias.numel(), nonzeros, policy.stored([name], True), sparse=True)
    return Storage(rows, tensors, unused)


def _ran(info: TensorInfo, ran: set[str]) -> bool:
    """Whether a module holding the tensor (under any of its names) ran."""
    return any(name.rpartition(".")[0] in ran for name in info.names)


Adjustment = tuple[str, float, float, float, float]
"""(module path, mults, adds, others, flops) to add to the dot_product counts of a module row"""


def settle(
    uses: dict[int, tuple[TensorInfo, dict[tuple[str, int, int, float], float]]],
    table: WeightTable,
    policy: BitPolicy,
    samples: float,
    weights: Weights = Weights(),
) -> list[Adjustment]:
    """The dot products of each stored tensor, priced dense during the forward (``uses``: outputs by module,
    widths and terms per output), brought to the density d of the representation chosen for it: d * terms terms
    per output, as :func:`costs.dot_product` prices them. The choice weighs the per-term part of their operations
    per sample (kept in ``info.uses``), the part a density scales."""
    rules = policy.rules
    rule = rules.ops.get("dot_product")
    if rule is None or not uses:
        return []
    e, g = rule.per_element, rule.per_group
    unit, add_bits = float(rules.unit_bits), policy.add_bits

    def counts(elements: float, groups: float) -> tuple[float, float, float]:
        return (elements * e.mults + groups * g.mults, elements * e.adds + groups * g.adds,
                elements * e.others + groups * g.others)

    def flops(c: tuple[float, float, float], mult_bits: int, other_bits: int) -> float:
        return (c[0] * mult_bits + c[1] * add_bits + c[2] * other_bits) / unit

    adjustments: list[Adjustment] = []
    for info, calls in uses.values():
        dense = {key: counts(key[3] * outputs, outputs) for key, outputs in calls.items()}
        # what a density scales: the per-term part of the price (the per-output part stays)
        info.uses = sum(flops(counts(k[3] * o, 0.0), k[1], k[2]) for k, o in calls.items()) / samples
        shape = choose(info.options(rules.mask), info.bits, unit, table.choice, weights, info.uses)
        if shape.density == 1.0:
            continue
        for (path, mb, ob, terms), outputs in calls.items():
            kept = terms * shape.density * outputs
            now, before = counts(kept, min(outputs, kept)), dense[(path, mb, ob, terms)]
            change = tuple(a - b for a, b in zip(now, before, strict=True))
            adjustments.append((path, *change, flops(change, mb, ob)))
    return adjustments
