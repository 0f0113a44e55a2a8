"""Audit what a model really stores against what its user declared: bit-widths, sparsity, quantizer scales.

``audit(model, bits=8)`` measures every weight (the uniform grid its values lie on, per tensor and per row; its
nonzeros and where its mask comes from: explicit zeros, torch.nn.utils.prune, a ``<name>_mask`` beside it, or
blocks), the activation quantizers (torch.ao FakeQuantize, modules with ``output_bits``) and the exactness of
their scales in fp32 (rules §1.3-1.5), and lists every violation of the declaration.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field
from torch import nn

from micronet_score.counting.bits import BitPolicy, quantized_bits
from micronet_score.counting.blocks import Blocks
from micronet_score.counting.grid import dtype_bits, exact_scale_bits, mantissa_bits, measure, measure_rows
from micronet_score.counting.packed import packed_modules
from micronet_score.counting.representation import Choice, block_options, check_choice, choose, options
from micronet_score.counting.storage import mask_pairs, storage_key
from micronet_score.errors import MicronetError
from micronet_score.hints import unquantized_names
from micronet_score.ruleset import RuleSet, load_rules

Role = Literal["weight", "packed", "quantizer", "buffer"]
BlockShape = tuple[int, int]

_QUANTIZER_KEYS = ("max_abs", "inv_scale", "scale", "zero_point", "forward_bp", "min_val", "max_val", "eps")
_STATE_KEYS = ("running_mean", "running_var", "num_batches_tracked", "fake_quant_enabled", "observer_enabled")


class TensorAudit(BaseModel):
    """One stored tensor: declared versus measured width, and its sparsity."""

    name: str
    role: Role
    dtype: str
    numel: int
    declared_bits: int | None = Field(description="what the user declared (None: nothing)")
    storage_bits: int = Field(description="width of its dtype (fp32: 32, qint8: 8)")
    measured_bits: int | None = Field(description="narrowest uniform grid per tensor (None: on no grid)")
    row_bits: int | None = Field(default=None, description="narrowest grid with one scale per row (dim 0)")
    distinct: int
    nonzeros: int
    density: float
    mask_source: Literal["zeros", "prune", "mask"] | None = None
    block_shape: BlockShape | None = None
    block_source: Literal["declared", "detected"] | None = None
    blocks_kept: int | None = None
    representation: str = Field(
        default="dense", description="dense, masked or block RxC: the cheapest storage, the rule count uses"
    )
    stored_values: int = Field(description="values the representation stores: every value, nonzeros, or kept blocks")
    mask_bits: float = Field(description="bits of the sparsity mask under the rule set (per element or per block)")

    @property
    def bits(self) -> int | None:
        """The narrowest width holding the values (per tensor or per row); None: on no uniform grid."""
        widths = [b for b in (self.measured_bits, self.row_bits) if b is not None]
        return min(widths) if widths else None


class ActivationAudit(BaseModel):
    """A source of activation widths: a fake quantizer or a module with ``output_bits``."""

    name: str
    source: str
    bits: int
    scales: int = 0
    scale_mantissa_bits: int | None = Field(default=None, description="most significant bits of its scales")


class Violation(BaseModel):
    tensor: str
    kind: Literal["width", "activation", "scale", "block"]
    message: str


class AuditReport(BaseModel):
    """Everything :func:`audit` found; ``violations`` empty when the declaration holds."""

    rules: str
    bits: int | None = None
    act_bits: int | None = None
    weight_bits: dict[str, int] = Field(default_factory=dict)
    tensors: list[TensorAudit] = Field(default_factory=list)
    activations: list[ActivationAudit] = Field(default_factory=list)
    violations: list[Violation] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def tensor(self, name: str) -> TensorAudit:
        for entry in self.tensors:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def summary(self) -> str:
        """A few lines for a human: what was measured, and every violation."""
        weights = [t for t in self.tensors if t.role in ("weight", "packed")]
        values = sum(t.numel for t in weights)
        nonzeros = sum(t.nonzeros for t in weights)
        widths = sorted({t.bits if t.bits is not None else t.storage_bits for t in weights})
        sources = sorted(
            {t.mask_source for t in weights if t.mask_source} | {"block" for t in weights if t.block_shape}
        )
        lines = [
            f"audit ({self.rules}): {len(weights)} weight tensors, {values:,} values, density "
            f"{nonzeros / values if values else 1:.1%}" + (f" (masks: {', '.join(sources)})" if sources else ""),
            "measured weight widths: " + (", ".join(f"{w}" for w in widths) or "none") + " bits",
        ]
        if self.activations:
            act = sorted({a.bits for a in self.activations})
            lines.append(f"activation quantizers: {len(self.activations)} ({', '.join(map(str, act))} bits)")
        if self.violations:
            lines.append(f"{len(self.violations)} violation(s):")
            lines += [f"  - {v.message}" for v in self.violations]
        else:
            lines.append("the declared widths hold")
        return "\n".join(lines)

    def raise_if_violations(self) -> None:
        """MicronetError listing every violation (nothing when the declaration holds)."""
        if self.violations:
            raise MicronetError(
                f"{len(self.violations)} declared width(s) do not hold: "
                + "; ".join(v.message for v in self.violations)
            )


def audit(
    model: nn.Module | Mapping[str, Any],
    bits: int | None = None,
    weight_bits: Mapping[str, int] | None = None,
    act_bits: int | None = None,
    rules: str | RuleSet = "micronet-2019",
    block_shape: BlockShape | Mapping[str, BlockShape] | None = None,
    representation: str = "auto",
) -> AuditReport:
    """Measure a model (or a state dict) and check the declared widths; see :class:`AuditReport`.

    Each weight's representation is chosen by the rule ``count`` stores it with (dense, masked or block-sparse,
    the cheapest storage; see :mod:`micronet_score.counting.representation`); ``representation`` forces one,
    ``block_shape`` declares the block shape (of every tensor, or by name)."""
    rule_set = load_rules(rules)
    choice = check_choice(representation, rule_set)
    unquantized = unquantized_names(model.named_modules()) if isinstance(model, nn.Module) else frozenset()
    policy = BitPolicy(rule_set, bits, act_bits, dict(weight_bits or {}), unquantized=unquantized)
    if block_shape is not None and not rule_set.mask.block_sparsity:
        raise MicronetError(f"rule set {rule_set.name} does not allow block sparsity: drop block_shape")
    if isinstance(model, nn.Module):
        entries, activations = _module_entries(model), module_activations(model)
    elif isinstance(model, Mapping):
        entries, activations = _state_entries(model), []
    else:
        raise MicronetError(f"can only audit a torch.nn.Module or a state dict (got {type(model).__name__})")
    known = {n for names, *_ in entries for n in names}
    unknown = sorted(set(policy.weight_bits) - known)
    if unknown:
        raise MicronetError(f"weight_bits names no tensor of the model: {', '.join(unknown)}")
    tensors = [
        _tensor_audit(names[0], role, values, source, policy.declared(names, role in ("weight", "packed")),
                      _block_shape(block_shape, names), rule_set, choice)
        for names, role, values, source in entries
    ]
    return audited(tensors, activations, policy)


def audited(
    tensors: list[TensorAudit], activations: list[tuple[ActivationAudit, list[float]]], policy: BitPolicy
) -> AuditReport:
    """The report of tensors and activation quantizers measured (here, or streamed from files), with every
    violation of the declaration in ``policy``."""
    act_bits = policy.act_bits
    report = AuditReport(rules=policy.rules.name, bits=policy.bits, act_bits=act_bits,
                         weight_bits=dict(policy.weight_bits))
    for entry in tensors:
        report.tensors.append(entry)
        report.violations += _width_violations(entry)
    for activation, scales in activations:
        report.activations.append(activation)
        report.violations += _activation_violations(activation, scales, act_bits)
    if act_bits is not None and not activations and not any(t.role == "packed" for t in report.tensors):
        report.violations.append(
            Violation(
                tensor="",
                kind="activation",
                message=f"activations declared as {act_bits} bits, but the model has no activation quantizer "
                "(no FakeQuantize, no module with output_bits, no quantized module)",
            )
        )
    return report


# --- what is stored ---------------------------------------------------------------------------------------

Entry = tuple[list[str], Role, torch.Tensor, str | None]
"""(names, role, effective values, mask source)"""


def _module_entries(model: nn.Module) -> list[Entry]:
    entries: list[Entry] = []
    skip: set[int] = set()
    quantizers = {path for path, m in model.named_modules() if _is_quantizer(m)}
    for path, module in model.named_modules():
        for base, orig, mask, source in mask_pairs(module):
            full = f"{path}.{base}" if path else base
            skip.update((storage_key(orig), storage_key(mask)))
            with torch.no_grad():
                entries.append(([full, f"{full}_orig"], "weight", orig.detach() * mask.detach(), source))
    for path, packed in packed_modules(model).items():
        entries.append(([f"{path}.weight"], "packed", packed.weight, None))
        if packed.bias is not None:
            entries.append(([f"{path}.bias"], "weight", packed.bias.detach(), None))
    seen: dict[int, list[str]] = {}
    for is_parameter, items in (
        (True, model.named_parameters(remove_duplicate=False)),
        (False, model.named_buffers(remove_duplicate=False)),
    ):
        for name, tensor in items:
            key = storage_key(tensor)
            if key in skip or tensor.device.type == "meta":
                continue
            if key in seen:
                seen[key].append(name)
                continue
            seen[key] = [name]
            owner = name.rpartition(".")[0]
            role: Role = "weight" if is_parameter else ("quantizer" if owner in quantizers else "buffer")
            entries.append((seen[key], role, tensor.detach(), None))
    return entries


def _state_entries(state: Mapping[str, Any]) -> list[Entry]:
    """A state dict: masks beside weights by name (``<k>_orig``/``<k>_mask``, ``<k>_mask``, ``<k>.mask``)."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    entries: list[Entry] = []
    used: set[str] = set()
    for key, mask in tensors.items():
        for suffix in ("_mask", ".mask"):
            if not key.endswith(suffix):
                continue
            base = key[: -len(suffix)]
            orig, source = (f"{base}_orig", "prune") if f"{base}_orig" in tensors else (base, "mask")
            if orig in tensors and tensors[orig].shape == mask.shape:
                used.update((key, orig))
                entries.append(([base, orig], "weight", tensors[orig] * mask, source))
    for key, value in state.items():
        if key.endswith("_packed_params._packed_params") and isinstance(value, tuple) and value:
            path = key[: -len("._packed_params._packed_params")]
            entries.append(([f"{path}.weight"], "packed", value[0], None))
            if len(value) > 1 and isinstance(value[1], torch.Tensor):
                entries.append(([f"{path}.bias"], "weight", value[1], None))
            continue
        if key in used or not isinstance(value, torch.Tensor):
            continue
        last = key.rpartition(".")[2]
        role: Role = "quantizer" if last in _QUANTIZER_KEYS else "buffer" if last in _STATE_KEYS else "weight"
        entries.append(([key], role, value, None))
    return entries


def _is_quantizer(module: nn.Module) -> bool:
    return isinstance(module, (torch.ao.quantization.FakeQuantizeBase, torch.ao.quantization.ObserverBase)) or (
        _output_bits(module) is not None
    )


def _output_bits(module: nn.Module) -> int | None:
    width = getattr(module, "output_bits", None)
    return width if isinstance(width, int) and not isinstance(width, bool) else None


def _block_shape(declared: BlockShape | Mapping[str, BlockShape] | None, names: list[str]) -> BlockShape | None:
    if declared is None or isinstance(declared, tuple):
        return declared
    return next((tuple(declared[n]) for n in names if n in declared), None)


# --- measuring one tensor -----------------------------------------------------------------------------------


def _tensor_audit(
    name: str,
    role: Role,
    values: torch.Tensor,
    source: str | None,
    declared: int | None,
    block_shape: BlockShape | None,
    rules: RuleSet,
    choice: Choice = "auto",
) -> TensorAudit:
    dense = values.dequantize() if values.is_quantized else values
    grid = measure(dense) if values.numel() else None
    row_bits = measure_rows(dense)[0] if values.dim() > 1 and values.numel() else None
    nonzeros = int(torch.count_nonzero(dense))
    numel = values.numel()
    width = declared if declared is not None else dtype_bits(values.dtype)
    tilings = []
    if role in ("weight", "packed") or block_shape is not None:
        forced = "block" if block_shape is not None and choice == "auto" else choice
        tilings = block_options(dense, nonzeros, width, rules.mask, block_shape, forced)
    return measured_entry(
        name, role, values.dtype, numel, grid.bits if grid is not None else None, row_bits,
        grid.distinct if grid is not None else 0, nonzeros, tilings, source, declared, rules,
        "block" if block_shape is not None and choice == "auto" else choice, block_shape is not None,
    )


def measured_entry(
    name: str,
    role: Role,
    dtype: torch.dtype,
    numel: int,
    measured_bits: int | None,
    row_bits: int | None,
    distinct: int,
    nonzeros: int,
    tilings: list[Blocks],
    source: str | None,
    declared: int | None,
    rules: RuleSet,
    choice: Choice = "auto",
    declared_blocks: bool = False,
) -> TensorAudit:
    """One tensor's entry from what was measured of its values: its representation chosen from ``tilings`` (the
    block tilings worth pricing) by the rule ``count`` uses."""
    if source is None and nonzeros < numel:
        source = "zeros"
    width = declared if declared is not None else dtype_bits(dtype)
    found = options(numel, nonzeros, width, rules.mask, tilings)
    shape = choose(found, width, float(rules.unit_bits), choice)
    blocks = shape.blocks
    block_source = ("declared" if declared_blocks else "detected") if blocks is not None else None
    return TensorAudit(
        name=name,
        role=role,
        dtype=_dtype_name(dtype),
        numel=numel,
        declared_bits=declared,
        storage_bits=dtype_bits(dtype),
        measured_bits=measured_bits,
        row_bits=row_bits,
        distinct=distinct,
        nonzeros=nonzeros,
        density=nonzeros / numel if numel else 1.0,
        mask_source=source,
        block_shape=blocks.shape if blocks is not None else None,
        block_source=block_source,
        blocks_kept=blocks.kept if blocks is not None else None,
        representation=shape.label,
        stored_values=shape.values,
        mask_bits=shape.mask_bits,
    )


def _dtype_name(dtype: torch.dtype) -> str:
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
    return names.get(dtype, str(dtype).removeprefix("torch."))


def _width_violations(entry: TensorAudit) -> list[Violation]:
    declared = entry.declared_bits
    if declared is None or entry.role not in ("weight", "packed"):
        return []
    measured = entry.bits
    if measured is not None and measured <= declared:
        return []
    if measured is None and declared >= entry.storage_bits:
        return []  # declared at (or above) the width the values are stored at: nothing to prove
    what = f"{entry.name}: {entry.dtype} values declared as {declared} bits: {entry.distinct:,} distinct values"
    if measured is None:
        need = f"lie on no uniform grid (they need {entry.storage_bits} bits)"
    else:
        per = " (one scale per row)" if entry.row_bits == measured and entry.measured_bits != measured else ""
        need = f"need {measured} bits{per}"
    return [Violation(tensor=entry.name, kind="width", message=f"{what} {need}")]


# --- activations ------------------------------------------------------------------------------------------


def module_activations(model: nn.Module) -> list[tuple[ActivationAudit, list[float]]]:
    """Fake quantizers (torch.ao FakeQuantize) and ``output_bits`` modules, with their scales."""
    found = []
    for path, module in model.named_modules():
        if isinstance(module, torch.ao.quantization.FakeQuantizeBase):
            bits = quantized_bits(module.quant_min, module.quant_max)
            scales = module.scale.detach().reshape(-1).tolist() if isinstance(module.scale, torch.Tensor) else []
            found.append((_activation(path, type(module).__name__, bits, scales), scales))
            continue
        bits = _output_bits(module)
        if bits is None:
            continue
        scales = [
            v
            for name, buffer in module.named_buffers(recurse=False)
            if "scale" in name and buffer.is_floating_point()
            for v in buffer.detach().reshape(-1).tolist()
        ]
        found.append((_activation(path, "output_bits", bits, scales), scales))
    return found


def _activation(path: str, source: str, bits: int, scales: list[float]) -> ActivationAudit:
    widest = max((mantissa_bits(s) for s in scales), default=None)
    return ActivationAudit(name=path, source=source, bits=bits, scales=len(scales), scale_mantissa_bits=widest)


def _activation_violations(activation: ActivationAudit, scales: list[float], act_bits: int | None) -> list[Violation]:
    found = []
    if act_bits is not None and activation.bits > act_bits:
        found.append(
            Violation(
                tensor=activation.name,
                kind="activation",
                message=f"{activation.name}: its {activation.source} quantizes activations to {activation.bits} bits, "
                f"declared {act_bits}",
            )
        )
    limit = exact_scale_bits(activation.bits)
    wide = [s for s in scales if mantissa_bits(s) > limit]
    if wide:
        found.append(
            Violation(
                tensor=activation.name,
                kind="scale",
                message=f"{activation.name}: {len(wide)} of {len(scales)} scale(s) have up to "
                f"{activation.scale_mantissa_bits} significant bits (e.g. {wide[0]!r}); {activation.bits}-bit values "
                f"times the scale are exact in fp32 only with at most {limit} (rules §1.5)",
            )
        )
    return found


def declared_width_warnings(
    model: nn.Module,
    *,
    bits: int | None = None,
    act_bits: int | None = None,
    weight_bits: Mapping[str, int] | None = None,
    rules: str | RuleSet = "micronet-2019",
    strict: bool = False,
) -> list[str]:
    """The check behind every count with declared widths (the CLI's ``--bits``/``--act-bits`` and the API's
    ``bits``/``act_bits``/``weight_bits``): audit the declaration against what the model holds; each violation
    is one warning line (``strict``: :class:`MicronetError` instead). Nothing declared: nothing to check."""
    if bits is None and act_bits is None and not weight_bits:
        return []
    result = audit(model, bits=bits, weight_bits=weight_bits, act_bits=act_bits, rules=rules)
    if strict:
        result.raise_if_violations()
    return [f"audit: {v.message}" for v in result.violations]
