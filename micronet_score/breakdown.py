"""Per-layer and per-op rows of a report, aggregated, sorted and written as CSV, Markdown or JSON.

The rows always add up to the report's totals: aggregation to a depth sums the leaf rows below each prefix,
and ``--top`` keeps the totals row of the whole model.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Literal

from micronet_score.report import Report

LAYER_COLUMNS = ("name", "type", "params", "nonzeros", "density", "bits", "storage", "representation",
                 "mults", "adds", "others", "flops", "share")
OP_COLUMNS = ("name", "calls", "mults", "adds", "others", "flops", "share")
_SUMMED = ("params", "nonzeros", "storage", "mults", "adds", "others", "flops", "share")

By = Literal["module", "op"]
SortKey = Literal["ops", "params", "name"]


def _prefix(name: str, depth: int | None) -> str:
    if depth is None or not name:
        return name
    return ".".join(name.split(".")[:depth])


def module_rows(report: Report, depth: int | None = None) -> list[dict]:
    """One row per module path (leaf rows summed up to ``depth`` path components; None keeps every row)."""
    types = {row.name: row.type for row in report.layers}
    grouped: dict[str, dict] = {}
    for layer in report.layers:
        key = _prefix(layer.name, depth)
        row = grouped.setdefault(key, {"name": key, "type": types.get(key, ""), "bits": None,
                                       "representation": {}, **{c: 0 for c in _SUMMED}})
        for kind in (layer.representation or "").split("+"):
            if kind:
                row["representation"][kind] = None
        for column in _SUMMED:
            row[column] += getattr(layer, column)
        if layer.bits is not None:
            row["bits"] = max(row["bits"] or 0, layer.bits)
    for row in grouped.values():
        row["density"] = row["nonzeros"] / row["params"] if row["params"] else None
        row["representation"] = "+".join(row["representation"]) or None
    return [{c: row[c] for c in LAYER_COLUMNS} for row in grouped.values()]


def op_rows(report: Report) -> list[dict]:
    """One row per op family."""
    total = report.flops or 1.0
    return [{"name": op.family, "calls": op.calls, "mults": op.mults, "adds": op.adds, "others": op.others,
             "flops": op.flops, "share": op.flops / total} for op in report.ops]


def totals(report: Report, by: By = "module") -> dict:
    """The totals row: equal to the report's storage and operations."""
    if by == "op":
        return {"name": "total", "calls": sum(op.calls for op in report.ops), "mults": report.mults,
                "adds": report.adds, "others": report.others, "flops": report.flops, "share": 1.0}
    params = sum(row.params for row in report.layers)
    nonzeros = sum(row.nonzeros for row in report.layers)
    bits = [row.bits for row in report.layers if row.bits is not None]
    return {"name": "total", "type": "", "params": params, "nonzeros": nonzeros,
            "density": nonzeros / params if params else None, "bits": max(bits) if bits else None,
            "storage": report.params, "representation": None, "mults": report.mults, "adds": report.adds,
            "others": report.others, "flops": report.flops, "share": 1.0 if report.flops else 0.0}


def select(rows: list[dict], sort: SortKey | None = None, top: int | None = None) -> list[dict]:
    """Rows sorted by operations or parameters (largest first), cut to the ``top`` first."""
    if sort == "ops":
        rows = sorted(rows, key=lambda r: -r["flops"])
    elif sort == "params":
        rows = sorted(rows, key=lambda r: -r.get("storage", 0.0))
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
        lines.append("| " + " | ".join(_cell(row[c]).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def to_json(rows: list[dict], total: dict) -> str:
    return json.dumps({"rows": rows, "total": total}, indent=2)
