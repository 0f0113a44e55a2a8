"""Per-layer and per-op rows of a report, aggregated, sorted and written as CSV, Markdown or JSON.

The rows always add up to the report's totals: aggregation to a depth sums the leaf rows below each prefix,
and ``--top`` keeps the totals row of the whole model. Columns use the report's names in every format:
``parameters`` (raw count), ``storage`` and ``operations`` (32-bit equivalents).
"""

from __future__ import annotations

import csv
import io
import json
from typing import Literal

from micronet_score.render import printable
from micronet_score.report import LayerRow, Report

_REPRESENTED = "representation" in LayerRow.model_fields  # the storage representation of a layer's tensors
LAYER_COLUMNS = ("name", "type", "parameters", "nonzeros", "density", "bits",
                 *(("representation",) if _REPRESENTED else ()),
                 "storage", "mults", "adds", "others", "operations", "share")
OP_COLUMNS = ("name", "calls", "mults", "adds", "others", "operations", "share")
_SUMMED = ("parameters", "nonzeros", "storage", "mults", "adds", "others", "operations", "share")
JSON_ALIASES = {"params": "parameters", "flops": "operations"}
"""Schema-1 keys written beside the new ones in JSON for one release (``params`` was the raw count here)."""

By = Literal["module", "op"]
SortKey = Literal["ops", "operations", "storage", "parameters", "params", "name"]


def _prefix(name: str, depth: int | None) -> str:
    if depth is None or not name:
        return name
    return ".".join(name.split(".")[:depth])


def _representation(values: list[str]) -> str | None:
    distinct = sorted({v for v in values if v})
    return ", ".join(distinct) if distinct else None


def module_rows(report: Report, depth: int | None = None) -> list[dict]:
    """One row per module path (leaf rows summed up to ``depth`` path components; None keeps every row)."""
    types = {row.name: row.type for row in report.layers}
    grouped: dict[str, dict] = {}
    represented: dict[str, list[str]] = {}
    for layer in report.layers:
        key = _prefix(layer.name, depth)
        row = grouped.setdefault(key, {"name": key, "type": types.get(key, ""), "bits": None,
                                       **{c: 0 for c in _SUMMED}})
        for column in _SUMMED:
            row[column] += getattr(layer, column)
        if layer.bits is not None:
            row["bits"] = max(row["bits"] or 0, layer.bits)
        represented.setdefault(key, []).append(getattr(layer, "representation", None))
    for key, row in grouped.items():
        row["density"] = row["nonzeros"] / row["parameters"] if row["parameters"] else None
        row["representation"] = _representation(represented[key])
    return [{c: row[c] for c in LAYER_COLUMNS} for row in grouped.values()]


def op_rows(report: Report) -> list[dict]:
    """One row per op family."""
    total = report.operations or 1.0
    return [{"name": op.family, "calls": op.calls, "mults": op.mults, "adds": op.adds, "others": op.others,
             "operations": op.operations, "share": op.operations / total} for op in report.ops]


def totals(report: Report, by: By = "module") -> dict:
    """The totals row: equal to the report's storage and operations."""
    if by == "op":
        return {"name": "total", "calls": sum(op.calls for op in report.ops), "mults": report.mults,
                "adds": report.adds, "others": report.others, "operations": report.operations, "share": 1.0}
    nonzeros = sum(row.nonzeros for row in report.layers)
    bits = [row.bits for row in report.layers if row.bits is not None]
    row = {"name": "total", "type": "", "parameters": report.parameters, "nonzeros": nonzeros,
           "density": nonzeros / report.parameters if report.parameters else None,
           "bits": max(bits) if bits else None,
           "representation": _representation([getattr(r, "representation", None) for r in report.layers]),
           "storage": report.storage, "mults": report.mults, "adds": report.adds, "others": report.others,
           "operations": report.operations, "share": 1.0 if report.operations else 0.0}
    return {c: row[c] for c in LAYER_COLUMNS}


def score_parts(report: Report, rules, depth: int | None = 1) -> list[dict]:
    """Where the score goes: each module's storage / baseline storage and operations / baseline operations (the
    score is linear in both, so the parts of all modules add up to the report's score). ``rules`` is the rule set
    the report was counted by; without a track the parts are shares of the model's storage and operations."""
    rows = module_rows(report, depth)
    if report.track is not None:
        track = rules.track(report.track)
        storage_unit, operations_unit = track.baseline_params, track.baseline_flops
    else:
        storage_unit, operations_unit = report.storage or 1.0, report.operations or 1.0
    return [{"name": row["name"], "storage": row["storage"] / storage_unit,
             "operations": row["operations"] / operations_unit} for row in rows]


def select(rows: list[dict], sort: SortKey | None = None, top: int | None = None) -> list[dict]:
    """Rows sorted by operations, storage or raw parameters (largest first) or name, cut to the ``top`` first.
    ``params`` (the schema-1 name) sorts by storage, as it did."""
    if sort in ("ops", "operations"):
        rows = sorted(rows, key=lambda r: -r["operations"])
    elif sort in ("storage", "params"):
        rows = sorted(rows, key=lambda r: -r.get("storage", 0.0))
    elif sort == "parameters":
        rows = sorted(rows, key=lambda r: -r.get("parameters", 0))
    elif sort == "name":
        rows = sorted(rows, key=lambda r: r["name"])
    return rows[:top] if top is not None else rows


def columns(by: By) -> tuple[str, ...]:
    return OP_COLUMNS if by == "op" else LAYER_COLUMNS


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if value != int(value) else str(int(value))
    return str(value)


def to_csv(rows: list[dict], total: dict, by: By) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns(by))
    for row in [*rows, total]:
        writer.writerow([_cell(row[c]) for c in columns(by)])
    return out.getvalue()


def to_markdown(rows: list[dict], total: dict, by: By) -> str:
    cols = columns(by)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in [*rows, total]:
        lines.append("| " + " | ".join(printable(_cell(row[c])).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _with_aliases(row: dict) -> dict:
    return {**row, **{old: row[new] for old, new in JSON_ALIASES.items() if new in row}}


def to_json(rows: list[dict], total: dict) -> str:
    return json.dumps({"rows": [_with_aliases(r) for r in rows], "total": _with_aliases(total)}, indent=2)
