"""Storage accounting: every value needed for inference, by storage, at its bit-width, plus sparsity masks.

Rules (§1.3): nonzero values at their width, plus a bitmask of the full shape (1 bit per element) for sparse
tensors; tied tensors count once; frozen parameters count; buffers count when the forward reads them (quantizer
scales, running statistics); batch norm folds per the rule set (after a conv/linear: one bias per channel;
elsewhere: a scale and a shift per channel). ``torch.nn.utils.prune`` reparametrisations (and masks saved
beside their weights as ``<name>_mask``) store the product ``weight_orig * weight_mask``: its nonzeros plus the
mask. Tensors of a narrow integer or quantized dtype count at that width unless declared otherwise; the packed
weights of torch.ao quantized modules count at their width, with their scales, zero points and float bias.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from micronet_score.counting.bits import BitPolicy
from micronet_score.counting.grid import DTYPE_BITS
from micronet_score.counting.packed import Packed, packed_modules


def storage_key(tensor: torch.Tensor) -> int:
    """Identity of a tensor's storage: views and tied tensors share it (meta tensors too)."""
    return tensor.untyped_storage()._cdata


@dataclass(slots=True)
class TensorInfo:
    """A stored tensor of the model: where it lives, its width, and its nonzeros (density of its operand)."""

    names: list[str]
    module: str
    numel: int
    bits: int
    is_parameter: bool
    nonzeros: int
    known: bool = True
    read: bool = False
    density: float = 1.0
    version: int = -1


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

    @classmethod
    def of(cls, model: nn.Module, policy: BitPolicy) -> WeightTable:
        table = cls()
        for is_parameter, items in (
            (True, model.named_parameters(remove_duplicate=False)),
            (False, model.named_buffers(remove_duplicate=False)),
        ):
            for name, tensor in items:
                key = storage_key(tensor)
                if key in table.by_key:
                    table.by_key[key].names.append(name)
                    continue
                table.by_key[key] = TensorInfo(
                    names=[name],
                    module=name.rpartition(".")[0],
                    numel=tensor.numel(),
                    bits=0,
                    is_parameter=is_parameter,
                    nonzeros=0,
                )
        tensors = dict(model.named_parameters(remove_duplicate=False))
        tensors.update(model.named_buffers(remove_duplicate=False))
        for info in table.by_key.values():
            info.bits = policy.stored(info.names, info.is_parameter, native_bits(tensors[info.names[0]]))
        for path, module in model.named_modules(remove_duplicate=True):
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
        table.packed = packed_modules(model)
        for packed in table.packed.values():
            policy.check_freebie(packed.bits, f"the packed weight of module {packed.module!r}")
        table.refresh(model)
        return table

    def refresh(self, model: nn.Module) -> None:
        """Recount nonzeros from the current values (a training loop may have pruned since)."""
        tensors = {storage_key(t): t for _, t in model.named_parameters(remove_duplicate=False)}
        tensors.update({storage_key(t): t for _, t in model.named_buffers(remove_duplicate=False)})
        self.meta = False
        for key, info in self.by_key.items():
            tensor = tensors.get(key)
            info.read = False
            if tensor is None or tensor._version == info.version:
                self.meta |= not info.known
                continue
            info.version = tensor._version
            nonzeros, known = count_nonzero(tensor)
            info.nonzeros, info.known = nonzeros, known
            info.density = nonzeros / info.numel if info.numel else 1.0
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
            pruned.info.density = nonzeros / pruned.info.numel if pruned.info.numel else 1.0
            self.meta |= not known

    def pruned_keys(self) -> set[int]:
        return {k for p in self.pruned.values() for k in (p.orig_key, p.mask_key)}


def native_bits(tensor: torch.Tensor) -> int | None:
    """Width a tensor's integer or quantized dtype gives its values (None for float and wide integer dtypes)."""
    if tensor.is_floating_point():
        return None
    return DTYPE_BITS.get(tensor.dtype)


def mask_pairs(module: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor, str]]:
    """Masks beside a module's own tensors: (name, tensor, mask, source) for ``<name>_orig`` + ``<name>_mask``
    (torch.nn.utils.prune) and ``<name>`` + ``<name>_mask`` (a mask saved beside its weight)."""
    own = dict(module.named_parameters(recurse=False))
    own.update(module.named_buffers(recurse=False))
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


def count_nonzero(tensor: torch.Tensor) -> tuple[int, bool]:
    """Nonzeros of a tensor and whether they are known (meta tensors have no values: counted dense)."""
    if tensor.device.type == "meta":
        return tensor.numel(), False
    with torch.no_grad():
        return int(torch.count_nonzero(tensor.detach())), True


@dataclass(slots=True)
class Stored:
    """32-bit-equivalent storage of one module row."""

    params: int = 0
    nonzeros: int = 0
    storage: float = 0.0
    bits: int | None = None


def account(table: WeightTable, norms: list[FoldedNorm], dropped: set[int], policy: BitPolicy) -> dict[str, Stored]:
    """Storage per module path: nonzeros * bits + mask bits (sparse tensors), divided by the unit width."""
    rules = policy.rules
    unit = float(rules.unit_bits)
    rows: dict[str, Stored] = {}

    def add(module: str, numel: int, nonzeros: int, bits: int) -> None:
        row = rows.setdefault(module, Stored())
        sparse = nonzeros < numel
        mask = numel * rules.mask.bits_per_element if (sparse or not rules.mask.only_sparse_tensors) else 0.0
        row.params += numel
        row.nonzeros += nonzeros
        row.storage += (nonzeros * bits + mask) / unit
        row.bits = bits if row.bits is None else max(row.bits, bits)

    skip = set(dropped) | table.pruned_keys()
    seen_norms: set[str] = set()
    for norm in norms:
        skip.update(norm.keys)
        if norm.module in seen_norms:
            continue
        seen_norms.add(norm.module)
        values = norm.channels * (1 if norm.folded else 2)
        add(norm.module, values, values, norm.bits)
    for key, info in table.by_key.items():
        if key in skip or not (info.is_parameter or info.read):
            continue
        add(info.module, info.numel, info.nonzeros, info.bits)
    for pruned in table.pruned.values():
        add(pruned.info.module, pruned.info.numel, pruned.info.nonzeros, pruned.info.bits)
    for packed in table.packed.values():
        add(packed.module, packed.numel, packed.nonzeros, packed.bits)
        add(packed.module, packed.scales, packed.scales, rules.default_bits)  # weight scales
        add(packed.module, packed.scales, packed.scales, packed.bits)  # and their zero points
        if packed.static:  # output scale and zero point (the requantization of the output)
            add(packed.module, 1, 1, rules.default_bits)
            add(packed.module, 1, 1, packed.bits)
        if packed.bias is not None:
            nonzeros, _ = count_nonzero(packed.bias)
            add(packed.module, packed.bias.numel(), nonzeros, policy.stored([f"{packed.module}.bias"], True))
    return rows
