"""Count a Hugging Face model directory without loading it: storage streamed from its safetensors shards,
operations from a forward of the architecture built on the meta device from its ``config.json``.

The meta model has every tensor's shape and dtype but no values; the statistics streamed from the files
(:mod:`micronet_score.streaming`: nonzeros, blocks, grid widths) stand in for them, so storage and the densities
of the dot products are those of the real weights, and the totals equal an in-memory count of the same model. With
no weight files (``config.json`` alone) every tensor counts dense at the configuration's dtype, with a warning.
"""

from __future__ import annotations

import functools
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from micronet_score.counting import Counter
from micronet_score.counting.bits import BitPolicy
from micronet_score.counting.representation import Choice, worth_tiling
from micronet_score.errors import MicronetError
from micronet_score.options import ruleset
from micronet_score.progress import rate_bar
from micronet_score.report import Report
from micronet_score.ruleset import DEFAULT_RULES
from micronet_score.sources import huggingface
from micronet_score.streaming import (
    CHUNK_BYTES,
    StoredTensor,
    TensorStats,
    Tilings,
    measure_files,
    memory_budget,
    total_bytes,
    weight_files,
)

if TYPE_CHECKING:
    from micronet_score.audit import AuditReport

DEFAULT_TOKENS = 128
"""Length of the example token sequence a language model is counted on."""


def is_model_directory(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def weights_exceed_memory(directory: Path) -> bool:
    """True when the directory's safetensors weights are larger than the memory budget (half of what is free)."""
    files = weight_files(directory)
    return bool(files) and total_bytes(files) > memory_budget()


def read_config(directory: Path) -> dict:
    """``config.json``, refusing quantized formats that are not counted honestly here (by name)."""
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise MicronetError(f"{path}: not a readable JSON configuration ({err})") from None
    if not isinstance(config, dict):
        raise MicronetError(f"{path}: not a model configuration (a JSON object)")
    quantization = config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "unnamed") if isinstance(quantization, dict) else "unnamed"
        raise MicronetError(
            f"{directory}: the weights are quantized with {method!r} (quantization_config in config.json); "
            "micronet-score does not read that packed format, so it cannot count its widths and nonzeros honestly. "
            "Count the unquantized model with --bits for the declared width, or a torch.ao quantized model"
        )
    return config


def _tilings(config: dict, counter_options: dict) -> Tilings:
    """The representation rule of the count, so that the streaming follows only block tilings that can win: each
    tensor at a width no larger than the count or the audit will store it at (the file's dtype or the
    configuration's, declared widths included)."""
    from micronet_score.counting.grid import dtype_bits
    from micronet_score.counting.representation import check_choice
    from micronet_score.counting.storage import native_bits

    rules = ruleset(counter_options.get("rules") or DEFAULT_RULES)
    policy = BitPolicy(rules, counter_options.get("bits"), counter_options.get("act_bits"),
                       dict(counter_options.get("weight_bits") or {}), counter_options.get("freebie", False))
    configured = getattr(torch, str(config.get("torch_dtype") or config.get("dtype") or "float32"), torch.float32)
    dtypes = {configured} if isinstance(configured, torch.dtype) else set()

    @functools.cache
    def native(dtype: torch.dtype) -> int | None:
        return native_bits(torch.empty(0, dtype=dtype, device="meta"))

    def width(tensor: StoredTensor) -> int:
        widths = [policy.stored([tensor.name], p, native(d)) for p in (True, False) for d in dtypes | {tensor.dtype}]
        declared = policy.declared([tensor.name], True)
        widths.append(declared if declared is not None else dtype_bits(tensor.dtype))
        return min(widths)

    return Tilings(rules.mask, check_choice(counter_options.get("representation", "auto"), rules), width)


def _has_vocabulary(config: dict) -> bool:
    """A language model's configuration: a vocabulary size, at the top or in its text configuration."""
    text = config.get("text_config")
    return bool(config.get("vocab_size") or (isinstance(text, dict) and text.get("vocab_size")))


@dataclass(frozen=True)
class Matched:
    """The files' tensors matched to the model's: nonzeros by name, tensors not in the files, the audit's entries."""

    nonzeros: dict[str, int]
    computed: list[str]
    """buffers the model computes from its configuration (not stored in the files), counted dense"""
    wider: list[str]
    """tensors stored in a wider float dtype than the architecture's (counted at the architecture's)"""


def match(model: nn.Module, stats: dict[str, TensorStats], directory: Path) -> Matched:
    """Every tensor of the model found in the files with its shape, and no file tensor the model lacks."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    stored = set(model.state_dict().keys())
    unexpected = sorted(set(stats) - set(tensors))
    if unexpected:
        raise MicronetError(f"{directory}: {len(unexpected)} tensor(s) in the files are not in the architecture of "
                            f"its config.json: {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
    misshapen, converted, wider = [], [], []
    for name, s in stats.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != s.shape:
            misshapen.append(f"{name} {list(s.shape)} (the architecture has {list(tensor.shape)})")
        elif tensor.is_floating_point() and not (s.dtype.is_floating_point and s.dtype.itemsize >= 2):
            converted.append(f"{name} ({str(s.dtype).removeprefix('torch.')})")
        elif tensor.is_floating_point() and s.dtype.itemsize > tensor.dtype.itemsize:
            wider.append(name)
    if misshapen:
        raise MicronetError(f"{directory}: {len(misshapen)} tensor(s) do not fit the architecture: "
                            + "; ".join(misshapen[:5]))
    if converted:
        raise MicronetError(f"{directory}: {len(converted)} floating-point weight(s) are stored in a narrower "
                            f"format: {', '.join(converted[:5])}; this quantized layout is not read here, so its "
                            "widths cannot be counted honestly")
    by_storage: dict[int, list[str]] = {}
    for name, tensor in tensors.items():
        by_storage.setdefault(id(tensor), []).append(name)
    missing, computed = [], []
    for names in by_storage.values():
        if any(n in stats for n in names):
            continue
        if any(n in stored for n in names):
            missing.append(names[0])
        else:
            computed.append(names[0])  # non-persistent buffers: computed from the configuration
    if missing:
        raise MicronetError(f"{directory}: {len(missing)} tensor(s) of the architecture are not in the files: "
                            f"{', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    nonzeros = {name: s.nonzeros for name, s in stats.items()}
    nonzeros.update((name, tensors[name].numel()) for name in computed)
    return Matched(nonzeros, computed, wider)


def audit_streamed(
    model: nn.Module, stats: dict[str, TensorStats], policy: BitPolicy, choice: Choice = "auto"
) -> AuditReport:
    """The audit of the streamed tensors (weights: parameters; the rest buffers) against the declaration, each
    represented by the rule ``count`` uses."""
    from micronet_score.audit import audited, measured_entry, module_activations
    from micronet_score.counting.grid import dtype_bits

    parameters = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    mask = policy.rules.mask
    entries = []
    for name, s in stats.items():
        is_weight = name in parameters
        declared = policy.declared([name], is_weight)
        width = declared if declared is not None else dtype_bits(s.dtype)
        tilings = s.tilings if is_weight and worth_tiling(s.numel, s.nonzeros, width, mask, choice) else []
        entries.append(measured_entry(
            name, "weight" if is_weight else "buffer", s.dtype, s.numel, s.measured_bits, s.row_bits, s.distinct,
            s.nonzeros, tilings, None, declared, policy.rules, choice,
        ))
    return audited(entries, module_activations(model), policy)


def count_directory(
    directory: Path,
    counter_options: dict,
    *,
    tokens: int = DEFAULT_TOKENS,
    chunk_bytes: int = CHUNK_BYTES,
    progress: bool | None = None,
) -> tuple[Report, AuditReport]:
    """Count a model directory from its files: (report, audit of its tensors). ``counter_options`` are
    :class:`Counter`'s keyword options (rules, track, bits, act_bits, freebie, strict)."""
    config = read_config(directory)
    if not _has_vocabulary(config):
        raise MicronetError(f"{directory}: counting a model directory runs its language model on {tokens} token ids, "
                            f"and this configuration ({config.get('model_type', 'no model_type')}) has no vocabulary")
    files = weight_files(directory)
    stats: dict[str, TensorStats] = {}
    counter_options = dict(counter_options)
    tilings = _tilings(config, counter_options)
    with ThreadPoolExecutor(1, thread_name_prefix="micronet-build") as builder:
        # importing transformers and building on meta overlaps reading the files
        building = builder.submit(huggingface.build_model, directory, "meta")
        if files:
            with rate_bar(total_bytes(files), "measuring weights", "bytes", progress) as advance:

                def measured(nbytes: int) -> None:
                    advance(nbytes)
                    if building.done() and building.exception() is not None:
                        raise building.exception()  # a configuration transformers cannot build: stop reading

                stats = measure_files(files, chunk_bytes=chunk_bytes, progress=measured, tilings=tilings)
        model = building.result()
    counter = Counter(model, **counter_options)
    warnings = []
    if stats:
        matched = match(model, stats, directory)
        counter.measured_elsewhere(matched.nonzeros, {name: s.tilings for name, s in stats.items()})
        if matched.wider:
            dtype = str(next(p.dtype for p in model.parameters())).removeprefix("torch.")
            warnings.append(f"{len(matched.wider)} tensor(s) are stored in a wider float dtype than the "
                            f"configuration's ({dtype}) and count at its width: {', '.join(matched.wider[:3])}")
        if matched.computed:
            warnings.append(f"{len(matched.computed)} buffer(s) are computed from the configuration, not stored in "
                            f"the files ({', '.join(matched.computed[:3])}): counted dense")
    else:
        warnings.append(f"{directory} has no safetensors weights: every tensor counts dense, from shapes alone")
    ids = torch.zeros((1, tokens), dtype=torch.long)
    samples = tokens if counter.per == "token" else 1
    with torch.no_grad():
        counter.count_shapes(ids, samples=samples)
    report = counter.report()
    if stats:
        warnings = [*report.warnings, *warnings]
    else:  # the report's own warning about meta tensors says the same as the one above
        warnings = [w for w in report.warnings if not w.startswith("meta tensors have no values")] + warnings
    audited = audit_streamed(model, stats, counter.policy, counter.representation)
    return report.model_copy(update={"warnings": warnings}), audited
