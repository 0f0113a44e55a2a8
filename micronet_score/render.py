"""Rich rendering of micronet-score's objects for the terminal (colour only on a terminal)."""

from __future__ import annotations

import math
import re

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from micronet_score.audit import AuditReport
from micronet_score.ruleset import Cost, RuleSet

_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]")
MAX_LINE = 4000
"""An error or warning line longer than this is cut (with the number of characters left out)."""


def printable(text: str, limit: int | None = None) -> str:
    """``text`` safe for a terminal: control characters (newlines, ESC sequences, bidirectional overrides) shown as
    escapes such as ``\\n`` and ``\\x1b``, so that a name from a file can neither forge a line nor drive the
    terminal; cut to ``limit`` characters (with how many were left out)."""
    if limit is not None and len(text) > limit:
        text = text[:limit] + f"... ({len(text) - limit:,} more characters)"
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def safe(value) -> str:
    """A value from a file or the user (a name, a path, a message), ready for a rich table or line: printable
    and with rich markup escaped."""
    return escape(printable(str(value)))


def console() -> Console:
    return Console(highlight=False)


def error_console() -> Console:
    return Console(stderr=True, highlight=False)


def _cost(cost: Cost) -> str:
    named = (("mult", cost.mults), ("add", cost.adds), ("other", cost.others))
    parts = [f"{value:g} {name}" for name, value in named if value]
    return ", ".join(parts) or "free"


def _number(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:,.2f}".rstrip("0").rstrip(".") + "M"
    return f"{value:,.0f}" if value >= 1000 else f"{value:g}"


def render_rules(rules: RuleSet, out: Console) -> None:
    out.print(f"[bold]{safe(rules.name)}[/]: {safe(rules.title)}")
    if rules.description:
        out.print(safe(rules.description))
    out.print(f"source: {safe(rules.source)}\n")

    tracks = Table(title="Tracks", title_justify="left")
    for column in ("track", "baseline", "storage", "operations", "quality threshold", "averaged per"):
        tracks.add_column(
            column, justify="right" if column in ("storage", "operations") else "left", no_wrap=column == "track"
        )
    for key, track in rules.tracks.items():
        threshold = f"{track.metric} {track.comparison.symbol} {_number(track.threshold)}"
        tracks.add_row(
            f"{safe(track.title)}\n[dim]{safe(key)}[/]", safe(track.baseline_model), _number(track.baseline_params),
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
    q = rules.quantization
    policy.add_row("quantized layers' scales / zero points", f"{q.scale_bits} bits / {q.zero_point_bits}")
    policy.add_row("attention scale", rules.attention.scale)
    policy.add_row("attention mask (explicit or causal)", rules.attention.mask)
    out.print(policy)

    ops = Table(title="Op prices: elements x per element + groups x per group", title_justify="left")
    ops.add_column("op family")
    ops.add_column("per element")
    ops.add_column("per group")
    for name, rule in rules.ops.items():
        if rule.made_of:
            parts = " + ".join(f"{n:g} {part}" for part, n in rule.made_of.items())
            ops.add_row(safe(name), f"made of {safe(parts)}", "")
            continue
        ops.add_row(safe(name), _cost(rule.per_element), _cost(rule.per_group) if rule.per_group != Cost() else "")
    out.print(ops)


def si(value: float) -> str:
    """Counts as people read them: 1.63M, 11.9M, 0.0475."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:,.4g}{suffix}"
    return f"{value:,.4g}"


VERDICT_STYLE = {"qualifies": "green", "does not qualify": "red", "partial run: not a verdict": "yellow"}


def render_report(report, title: str, out: Console) -> None:
    """The summary of one measurement: storage, operations, score, quality and verdict, uncounted ops."""
    unit = report.per
    table = Table(title=safe(title), title_justify="left", show_header=False)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("rules / track", f"{safe(report.rules)} / {safe(report.track or '-')}")
    table.add_row("parameters (raw count)", f"{report.parameters:,}")
    table.add_row("storage (32-bit equivalents)", si(report.storage))
    table.add_row(f"operations per {unit} (32-bit equivalents)", si(report.operations))
    table.add_row(f"  raw mults / adds / others per {unit}",
                  f"{si(report.mults)} / {si(report.adds)} / {si(report.others)}")
    table.add_row(f"{unit}s measured", f"{report.samples:,.0f}")
    if report.score is not None:
        table.add_row("score (lower is better)", f"{report.score:.6g}")
    if report.quality is not None:
        q = report.quality
        value = f"{q.value:,.6g}" if math.isfinite(q.value) else f"[red]{q.value} (not finite)[/]"
        table.add_row(safe(q.metric), value)
        table.add_row(f"threshold ({q.threshold:g})", f"[{VERDICT_STYLE[q.verdict]}]{q.verdict}[/]")
    if report.conversions:
        table.add_row("format conversions (free)", f"{report.conversions:,}")
    if any("NaN or Inf" in warning for warning in report.warnings):
        table.add_row("weights", "[red]NaN or Inf values (see the warnings)[/]")
    out.print(table)
    if report.uncounted:
        unc = Table(title="Ops without a price in the rule set (not counted)", title_justify="left")
        for column in ("op", "module", "calls", "elements"):
            unc.add_column(column, justify="right" if column in ("calls", "elements") else "left")
        for op in report.uncounted:
            unc.add_row(safe(op.op), safe(op.module or "<root>"), f"{op.calls:,}", f"{op.elements:,}")
        out.print(unc)


def _cell(column: str, value) -> str:
    if value is None:
        return ""
    if column == "share":
        return f"{100 * value:.2f}%"
    if column == "density":
        return f"{value:.3f}"
    if isinstance(value, float):
        return si(value)
    if isinstance(value, int) and column != "bits":
        return f"{value:,}"
    return safe(value)


def render_breakdown(rows: list[dict], total: dict, by: str, report, out: Console) -> None:
    from micronet_score.breakdown import columns

    cols = columns(by)
    title = f"per {by}: operations per {report.per}, storage in 32-bit equivalents"
    if by == "module" and out.width < 150:
        cols = ("name", "density", "bits", "storage", "mults", "adds", "others", "operations", "share")
        title += " (wider terminal or --format csv/md/json for every column)"
    table = Table(title=title, title_justify="left")
    for column in cols:
        table.add_column(column,
                         justify="left" if column in ("name", "type") else "right", overflow="fold",
                         min_width=16 if column == "name" else None)
    for row in rows:
        table.add_row(*(_cell(c, row[c]) if c != "name" else safe(row[c] or "<root>") for c in cols))
    table.add_section()
    table.add_row(*(_cell(c, total[c]) for c in cols), style="bold")
    out.print(table)


def render_comparison(reports: dict, out: Console) -> None:
    names = list(reports)
    first = reports[names[0]]
    table = Table(title="comparison (differences from the first)", title_justify="left")
    table.add_column("quantity")
    for name in names:
        table.add_column(safe(name), justify="right")
    for label, key in (("parameters", "parameters"), ("storage", "storage"), ("operations", "operations"),
                       ("mults", "mults"), ("adds", "adds"), ("others", "others"), ("score", "score")):
        cells = []
        for i, name in enumerate(names):
            value = getattr(reports[name], key)
            if value is None:
                cells.append("-")
                continue
            text = f"{value:.6g}" if key == "score" else f"{value:,}" if key == "parameters" else si(value)
            base = getattr(first, key)
            if i and base:
                text += f" ({100 * (value - base) / base:+.1f}%)"
            cells.append(text)
        table.add_row(label, *cells)
    qualities = [reports[name].quality for name in names]
    if any(q is not None for q in qualities):
        metric = next(q.metric for q in qualities if q is not None)
        table.add_row(safe(metric), *(f"{q.value:,.6g}" if q is not None else "-" for q in qualities))
        table.add_row("verdict", *(f"[{VERDICT_STYLE[q.verdict]}]{q.verdict}[/]" if q is not None else "-"
                                   for q in qualities))
    out.print(table)


def render_models(specs, out: Console) -> None:
    table = Table(title="bundled architectures", title_justify="left")
    for column in ("name", "track", "architecture", "aliases"):
        table.add_column(column)
    for spec in specs:
        table.add_row(safe(spec.name), safe(spec.track), safe(spec.title), safe(", ".join(spec.aliases)))
    out.print(table)


def render_audit(report: AuditReport, out: Console) -> None:
    """The audit as a table (one row per stored tensor, quantizer state left out) and its violations."""
    table = Table(title=f"Bits and sparsity audit ({report.rules})", title_justify="left")
    for column in ("tensor", "role", "dtype", "values", "declared", "measured", "per row", "density", "mask",
                   "stored as"):
        table.add_column(column, justify="right" if column in ("values", "density") else "left")
    flagged = {v.tensor for v in report.violations}
    for t in report.tensors:
        if t.role == "buffer":
            continue
        mask = safe(t.mask_source or "")
        if t.block_shape:
            mask = f"{mask} {safe(t.block_source)} {t.block_shape[0]}x{t.block_shape[1]} blocks".strip()
        measured = str(t.measured_bits) if t.measured_bits is not None else f"no grid ({t.storage_bits})"
        table.add_row(
            f"[red]{safe(t.name)}[/]" if t.name in flagged else safe(t.name),
            safe(t.role),
            safe(t.dtype),
            f"{t.numel:,}",
            "" if t.declared_bits is None else str(t.declared_bits),
            measured,
            "" if t.row_bits is None else str(t.row_bits),
            f"{t.density:.1%}",
            mask,
            t.representation,
        )
    out.print(table)
    for activation in report.activations:
        out.print(f"activation quantizer {safe(activation.name or '<root>')} ({safe(activation.source)}): "
                  f"{activation.bits} bits")
    for violation in report.violations:
        out.print(f"[yellow]violation[/] ({safe(violation.kind)}): {safe(violation.message)}")
    if not report.violations:
        out.print("[green]the declared widths hold[/]")
