"""One report builder for every backend: module rows from storage and operation tallies, totals, score."""

from __future__ import annotations

from collections.abc import Mapping

from micronet_score.counting.interpreter import Counts, FamilyCounts
from micronet_score.counting.storage import Storage
from micronet_score.report import LayerRow, OpTotal, Report, TensorRow, UncountedOp
from micronet_score.ruleset import RuleSet


def build_report(
    rules: RuleSet,
    track: str | None,
    samples: float,
    storage: Storage,
    modules: Mapping[str, object],
    rows: Mapping[str, Counts],
    families: Mapping[str, FamilyCounts],
    uncounted: list[UncountedOp],
    warnings: list[str],
    conversions: int = 0,
) -> Report:
    """The report: per module (in ``modules`` order; record_function regions after their module), per op family
    (largest first), per tensor; raw counts over everything measured, divided by ``samples``; storage and
    operations summed from the rows."""
    n = float(samples)
    total_flops = sum(r.flops for r in rows.values()) / n
    order = {path: i for i, path in enumerate(modules)}

    def place(path: str) -> tuple[int, int, str]:
        """A module's place; a record_function region's (a row that is no module): right after its module."""
        if path in order:
            return order[path], 0, ""
        parent = path
        while parent and parent not in order:
            parent = parent.rpartition(".")[0]
        return order.get(parent, len(order)), 1, path

    layers = []
    for path in sorted(set(storage.rows) | set(rows), key=place):
        s = storage.rows.get(path)
        counts = rows.get(path) or Counts()
        m, a, o, f = counts.mults / n, counts.adds / n, counts.others / n, counts.flops / n
        module = modules.get(path)
        layers.append(
            LayerRow(
                name=path,
                type=type(module).__name__ if module is not None else ("region" if path in rows else ""),
                parameters=s.params if s else 0,
                nonzeros=s.nonzeros if s else 0,
                density=(s.nonzeros / s.params) if s and s.params else None,
                bits=s.bits if s else None,
                storage=s.storage if s else 0.0,
                representation=s.representation if s else None,
                mults=m,
                adds=a,
                others=o,
                operations=f,
                share=f / total_flops if total_flops else 0.0,
            )
        )
    ops = [
        OpTotal(
            family=fam, calls=v.calls, mults=v.mults / n, adds=v.adds / n, others=v.others / n, operations=v.flops / n
        )
        for fam, v in sorted(families.items(), key=lambda kv: -kv[1].flops)
    ]
    warnings = list(warnings)
    if storage.unused:
        more = len(storage.unused) - 8
        names = ", ".join(storage.unused[:8]) + (f" and {more} more" if more > 0 else "")
        warnings.append(f"{len(storage.unused)} parameter(s) of modules that never ran, read by no op, are not "
                        f"stored: {names}")
    storage_total = sum(row.storage for row in layers)
    operations = sum(row.operations for row in layers)
    track_name = rules.track_name(track) if track else None
    return Report(
        rules=rules.name,
        track=track_name,
        samples=n,
        per=rules.tracks[track_name].per if track_name else "sample",
        parameters=sum(row.parameters for row in layers),
        storage=storage_total,
        operations=operations,
        mults=sum(row.mults for row in layers),
        adds=sum(row.adds for row in layers),
        others=sum(row.others for row in layers),
        score=rules.score(storage_total, operations, track_name) if track_name else None,
        layers=layers,
        tensors=[TensorRow(**{k: getattr(t, k) for k in TensorRow.model_fields}) for t in storage.tensors],
        unused=storage.unused,
        ops=ops,
        uncounted=uncounted,
        conversions=conversions,
        warnings=warnings,
    )
