"""A second, independent backend: fvcore's JIT-trace analysis with MicroNet op handles.

fvcore traces the model once (``torch.jit``) and calls a handle per ``aten::`` node; the handles here price
each node with the same cost functions and rule set as the dispatch interpreter, from the traced shapes only.
What a trace cannot see: weight values (so no sparsity: weights are dense, stored and priced, whatever their
zeros), quantizer marks (so only the declared global widths), and storage folding (batch norm storage counted as
its parameters). The dot
products of traceable models agree exactly with the dispatch interpreter; the tests check it.
"""

from __future__ import annotations

import logging
import math
from collections import Counter as Tally
from collections.abc import Callable, Mapping
from typing import Any

import torch
from fvcore.nn.jit_analysis import JitModelAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import nn

from micronet_score.counting import costs
from micronet_score.counting.assemble import build_report
from micronet_score.counting.bits import BitPolicy
from micronet_score.counting.interpreter import Counts, FamilyCounts
from micronet_score.counting.storage import WeightTable, account
from micronet_score.errors import MicronetError
from micronet_score.hints import unquantized_names
from micronet_score.options import CountOptions
from micronet_score.report import Report, UncountedOp

_LINEAR_NODES = {"aten::_convolution", "aten::linear", "aten::addmm", "aten::matmul", "aten::mm"}


def _numel(value: Any) -> int:
    shape = get_shape(value)
    return math.prod(shape) if shape is not None else 0


def _as_tally(bill: costs.Bill) -> Tally:
    tally: Tally = Tally()
    for family, counts in bill:
        if counts is None:
            tally[f"{family}/unpriced"] += 1
            continue
        for kind, value in zip(("mults", "adds", "others"), counts, strict=True):
            if value:
                tally[f"{family}/{kind}"] += value
    return tally


def _handles(prices: costs.Prices, fold_bn: bool) -> dict[str, Callable]:
    def conv(inputs: list, outputs: list) -> Tally:
        weight, transposed = get_shape(inputs[1]), inputs[6].toIValue()
        out = _numel(outputs[0])
        per_out = math.prod(weight[1:])
        terms = _numel(inputs[0]) * per_out / out if transposed else per_out
        bill = costs.dot_product(prices, terms, out)
        if get_shape(inputs[2]) is not None:
            bill += costs.bias(prices, out)
        return _as_tally(bill)

    def linear(inputs: list, outputs: list) -> Tally:
        x, out = get_shape(inputs[0]), _numel(outputs[0])
        bill = costs.dot_product(prices, x[-1], out)
        if len(inputs) > 2 and get_shape(inputs[2]) is not None:
            bill += costs.bias(prices, out)
        return _as_tally(bill)

    def addmm(inputs: list, outputs: list) -> Tally:
        out = _numel(outputs[0])
        return _as_tally(costs.dot_product(prices, get_shape(inputs[1])[-1], out) + costs.bias(prices, out))

    def matmul(inputs: list, outputs: list) -> Tally:
        return _as_tally(costs.dot_product(prices, get_shape(inputs[0])[-1], _numel(outputs[0])))

    def batch_norm(inputs: list, outputs: list) -> Tally:
        folded = fold_bn and inputs[0].node().kind() in _LINEAR_NODES
        return _as_tally(costs.batch_norm_inference(prices, _numel(outputs[0]), folded))

    def elementwise(family: str) -> Callable:
        return lambda inputs, outputs: _as_tally(costs.elementwise(prices, family, _numel(outputs[0])))

    def mean(inputs: list, outputs: list) -> Tally:
        return _as_tally(costs.reduction(prices, "mean", _numel(inputs[0]), _numel(outputs[0])))

    handles: dict[str, Callable | None] = {
        "aten::_convolution": conv,
        "aten::linear": linear,
        "aten::addmm": addmm,
        "aten::matmul": matmul,
        "aten::mm": matmul,
        "aten::bmm": matmul,
        "aten::batch_norm": batch_norm,
        "aten::adaptive_avg_pool2d": mean,
        "aten::mean": mean,
    }
    for family, names in {
        "relu": ("relu", "relu_"),
        "hardtanh": ("hardtanh", "hardtanh_", "relu6", "relu6_"),
        "add": ("add", "add_"),
        "mul": ("mul", "mul_"),
        "sigmoid": ("sigmoid", "sigmoid_"),
        "silu": ("silu", "silu_"),
    }.items():
        for name in names:
            handles[f"aten::{name}"] = elementwise(family)
    for free in ("flatten", "view", "reshape", "dropout", "embedding", "cat", "contiguous", "size"):
        handles[f"aten::{free}"] = None
    return handles


def count_fvcore(
    model: nn.Module,
    example_inputs: tuple,
    options: CountOptions | None = None,
    *,
    samples: float | None = None,
    sample_dim: int = 0,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> Report:
    """Count a traceable model with fvcore; ops at the declared global widths, weights dense."""
    options = options or CountOptions()
    if options.representation not in ("auto", "dense"):
        raise MicronetError("the fvcore backend prices every weight dense: representation must be auto or dense")
    if forward_kwargs:
        raise MicronetError("the fvcore backend cannot pass keyword arguments to forward (trace limitation)")
    ruleset, bits, freebie, strict = options.ruleset(), options.bits, options.freebie, options.strict
    track = options.track_name()
    policy = BitPolicy(ruleset, bits, options.act_bits, dict(options.weight_bits or {}), freebie,
                       unquantized_names(model.named_modules()))
    prices = costs.Prices(ruleset)
    analysis = JitModelAnalysis(model, tuple(example_inputs))
    analysis.set_op_handle(**_handles(prices, ruleset.folding.batch_norm_after_linear == "bias"))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    if samples is None:
        first = example_inputs[0] if example_inputs else None
        samples = first.shape[sample_dim] if isinstance(first, torch.Tensor) and first.dim() > sample_dim else 1
    n = float(samples)
    unit = float(ruleset.unit_bits)
    if freebie:
        mult_bits, other_bits = ruleset.freebie.mult_bits, ruleset.freebie.other_bits
    else:
        mult_bits = other_bits = max(policy.activation, bits or ruleset.default_bits)
    width = {"mults": mult_bits, "adds": policy.add_bits, "others": other_bits}

    by_module = analysis.by_module_and_operator()
    modules = dict(model.named_modules())
    rows: dict[str, Counts] = {}  # fvcore's counts include submodules: keep each module's own ops
    families: dict[str, FamilyCounts] = {}
    unpriced: list[UncountedOp] = []
    for path, module in modules.items():
        mine = Tally(by_module.get(path, {}))
        for child, _ in module.named_children():
            mine.subtract(by_module.get(f"{path}.{child}" if path else child, {}))
        for key, value in mine.items():
            if not value:
                continue
            family, _, kind = key.partition("/")
            if kind == "unpriced":
                unpriced.append(UncountedOp(op=family, module=path, calls=int(value), elements=0))
                continue
            counts = Counts(**{kind: value}, flops=value * width[kind] / unit)
            rows.setdefault(path, Counts()).add(counts)
            families.setdefault(family, FamilyCounts()).add(counts)
    for op, calls in analysis.unsupported_ops().items():
        unpriced.append(UncountedOp(op=op, module="", calls=calls, elements=0))
    if strict and unpriced:
        raise MicronetError("strict mode: ops without a price: " + ", ".join(u.op for u in unpriced))
    storage = account(WeightTable.of(model, policy, choice="dense"), [], set(), policy)
    warnings = ["fvcore backend: weights counted dense, widths global only, batch norm storage not folded"]
    return build_report(ruleset, track, n, storage, modules, rows, families, unpriced, warnings)
