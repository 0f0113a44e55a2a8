"""Rich rendering of micronet-score's objects for the terminal (colour only on a terminal)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from micronet_score.audit import AuditReport
from micronet_score.ruleset import Cost, RuleSet


def console() -> Console:
    return Console(highlight=False)


def error_console() -> Console:
    return Console(stderr=True, highlight=False)


def _cost(cost: Cost) -> str:
    parts = [f"{value:g} {name}" for name, value in (("mult", cost.mults), ("add", cost.adds), ("other", cost.others)) if value]
    return ", ".join(parts) or "free"


def _number(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:,.2f}".rstrip("0").rstrip(".") + "M"
    return f"{value:,.0f}" if value >= 1000 else f"{value:g}"


def render_rules(rules: RuleSet, out: Console) -> None:
    out.print(f"[bold]{rules.name}[/]: {rules.title}")
    if rules.description:
        out.print(rules.description)
    out.print(f"source: {rules.source}\n")

    tracks = Table(title="Tracks", title_justify="left")
    for column in ("track", "baseline", "storage", "operations", "quality threshold", "averaged per"):
        tracks.add_column(
            column, justify="right" if column in ("storage", "operations") else "left", no_wrap=column == "track"
        )
    for key, track in rules.tracks.items():
        threshold = f"{track.metric} {track.comparison.symbol} {_number(track.threshold)}"
        tracks.add_row(
            f"{track.title}\n[dim]{key}[/]", track.baseline_model, _number(track.baseline_params),
            _number(track.baseline_flops), threshold, track.per,
        )
    out.print(tracks)

    policy = Table(title="Policies", title_justify="left", show_header=False)
    policy.add_column("policy")
    policy.add_column("value")
    f = rules.freebie
    policy.add_row("unit", f"{rules.unit_bits} bits (a b-bit value or op counts b/{rules.unit_bits})")
    policy.add_row("accumulator", f"{rules.accumulator_bits} bits (additions)")
    policy.add_row("undeclared values", f"{rules.default_bits} bits")
    policy.add_row(
        "freebie",
        f"params {f.param_bits}, mults {f.mult_bits}, others {f.other_bits}, adds {f.add_bits} bits; "
        f"only if nothing is quantized below {f.max_quantized_bits} bits",
    )
    m = rules.mask
    policy.add_row(
        "sparsity mask",
        f"{m.bits_per_element:g} bit per element"
        + (f", {m.bits_per_block:g} per block for declared block sparsity" if m.block_sparsity else "")
        + ("; only tensors with zeros" if m.only_sparse_tensors else "; every tensor"),
    )
    fo = rules.folding
    policy.add_row("batch norm after conv/linear", fo.batch_norm_after_linear)
    policy.add_row("other batch norm", fo.batch_norm_elsewhere)
    policy.add_row("layer norm affine", fo.layer_norm_affine)
    out.print(policy)

    ops = Table(title="Op prices: elements x per element + groups x per group", title_justify="left")
    ops.add_column("op family")
    ops.add_column("per element")
    ops.add_column("per group")
    for name, rule in rules.ops.items():
        ops.add_row(name, _cost(rule.per_element), _cost(rule.per_group) if rule.per_group != Cost() else "")
    out.print(ops)


def render_audit(report: AuditReport, out: Console) -> None:
    """The audit as a table (one row per stored tensor, quantizer state left out) and its violations."""
    table = Table(title=f"Bits and sparsity audit ({report.rules})", title_justify="left")
    for column in ("tensor", "role", "dtype", "values", "declared", "measured", "per row", "density", "mask"):
        table.add_column(column, justify="right" if column in ("values", "density") else "left")
    flagged = {v.tensor for v in report.violations}
    for t in report.tensors:
        if t.role == "buffer":
            continue
        mask = t.mask_source or ""
        if t.block_shape:
            mask = f"{mask} {t.block_source} {t.block_shape[0]}x{t.block_shape[1]} blocks".strip()
        measured = str(t.measured_bits) if t.measured_bits is not None else f"no grid ({t.storage_bits})"
        table.add_row(
            f"[red]{t.name}[/]" if t.name in flagged else t.name,
            t.role,
            t.dtype,
            f"{t.numel:,}",
            "" if t.declared_bits is None else str(t.declared_bits),
            measured,
            "" if t.row_bits is None else str(t.row_bits),
            f"{t.density:.1%}",
            mask,
        )
    out.print(table)
    for activation in report.activations:
        out.print(f"activation quantizer {activation.name or '<root>'} ({activation.source}): {activation.bits} bits")
    for violation in report.violations:
        out.print(f"[yellow]violation[/] ({violation.kind}): {violation.message}")
    if not report.violations:
        out.print("[green]the declared widths hold[/]")
