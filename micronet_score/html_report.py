"""A self-contained HTML page of a report: the headline, where the score goes per module (treemaps of storage and
operations you can hover and click into, and each top-level module's part of the score), the per-layer table
(sortable), the audit's findings, the op families, uncounted ops and warnings.

The charts are plotly figures; plotly.js is written into the page, so it opens without a network. The page is
plain string formatting over escaped values: every name from a model goes through :func:`html.escape` (or JSON
with ``</`` broken up inside scripts).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from micronet_score import breakdown
from micronet_score.errors import MicronetError
from micronet_score.report import Report
from micronet_score.warning_groups import group_warnings

ROOT = "<model>"
PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#eeca3b", "#b279a2", "#ff9da6", "#9d755d",
           "#bab0ac")
VERDICT_CLASS = {"qualifies": "good", "does not qualify": "bad", "partial run: not a verdict": "partial"}


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _number(value: float | None, digits: int = 4) -> str:
    if value is None:
        return ""
    if not math.isfinite(value):
        return str(value)
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:,.{digits}g}{suffix}"
    return f"{value:,.{digits}g}"


def _script_json(value) -> str:
    """JSON safe inside a <script> element."""
    return json.dumps(value).replace("</", "<\\/")


# --- charts --------------------------------------------------------------------------------------------------


def _tree(report: Report, quantity: str) -> dict:
    """A treemap trace of one quantity ("storage" or "operations") over the module tree: every module path and its
    prefixes are nodes; a node's size is its own rows' value plus its descendants' (nodes of size zero left out)."""
    own: dict[str, dict] = {ROOT: {"value": 0.0, "parameters": 0, "type": ""}}
    for row in report.layers:
        parts = row.name.split(".") if row.name else []
        for depth in range(1, len(parts) + 1):
            own.setdefault(".".join(parts[:depth]), {"value": 0.0, "parameters": 0, "type": ""})
        node = own[row.name or ROOT]
        node["value"] += getattr(row, quantity)
        node["parameters"] += row.parameters
        node["type"] = row.type
    totals = {key: dict(node) for key, node in own.items()}
    for key in sorted(own, key=lambda k: -k.count(".") if k != ROOT else 1):  # deepest first, the root last
        if key == ROOT:
            continue
        parent = key.rsplit(".", 1)[0] if "." in key else ROOT
        totals[parent]["value"] += totals[key]["value"]
        totals[parent]["parameters"] += totals[key]["parameters"]
    top = [key for key in own if key != ROOT and "." not in key]
    colour = {key: PALETTE[i % len(PALETTE)] for i, key in enumerate(top)}
    whole = totals[ROOT]["value"] or 1.0
    ids, parents, labels, values, colours, custom = [], [], [], [], [], []
    for key, node in own.items():
        if totals[key]["value"] <= 0:
            continue
        ids.append(key)
        parents.append("" if key == ROOT else key.rsplit(".", 1)[0] if "." in key else ROOT)
        labels.append(key.rsplit(".", 1)[-1] if key != ROOT else (report.layers[0].type if report.layers
                                                                   else "model"))
        values.append(node["value"])
        colours.append(colour.get(key.split(".")[0], "#dddddd"))
        total = totals[key]
        custom.append([key, node["type"] or "-", _number(total["value"]), f"{total['value'] / whole:.2%}",
                       f"{total['parameters']:,}"])
    unit = "32-bit equivalents" if quantity == "storage" else f"32-bit equivalents per {report.per}"
    return {
        "type": "treemap", "ids": ids, "parents": parents, "labels": labels, "values": values,
        "branchvalues": "remainder", "maxdepth": 2, "customdata": custom, "marker": {"colors": colours},
        "textinfo": "label+percent root",
        "hovertemplate": (f"<b>%{{customdata[0]}}</b> (%{{customdata[1]}})<br>{quantity}: %{{customdata[2]}} "
                          f"({unit})<br>%{{customdata[3]}} of the model's {quantity}<br>"
                          "raw parameters: %{customdata[4]}<extra></extra>"),
        "name": quantity,
    }


def _score_bars(report: Report, rules) -> dict | None:
    """Each top-level module's part of the score, storage and operations stacked (largest first)."""
    if rules is None:
        return None
    parts = [p for p in breakdown.score_parts(report, rules, depth=1) if p["storage"] or p["operations"]]
    parts.sort(key=lambda p: p["storage"] + p["operations"])
    names = [p["name"] or ROOT for p in parts]
    label = "part of the score" if report.track else "share"
    traces = [
        {"type": "bar", "orientation": "h", "y": names, "x": [p[key] for p in parts], "name": title,
         "marker": {"color": colour},
         "hovertemplate": f"%{{y}}: %{{x:.4g}} ({title})<extra></extra>"}
        for key, title, colour in (("storage", "storage / baseline storage", "#4c78a8"),
                                   ("operations", "operations / baseline operations", "#f58518"))
    ]
    layout = {"barmode": "stack", "height": 120 + 28 * len(parts), "margin": {"l": 140, "r": 20, "t": 30, "b": 40},
              "xaxis": {"title": {"text": label}}, "yaxis": {"type": "category", "automargin": True},
              "legend": {"orientation": "h", "y": 1.12}}
    return {"data": traces, "layout": layout}


# --- tables --------------------------------------------------------------------------------------------------


def _table(columns: list[tuple[str, str]], rows: list[list[tuple[str, object]]], table_id: str,
           foot: list[tuple[str, object]] | None = None) -> str:
    """A sortable table: ``columns`` (key, header), rows of (shown text, sort value) cells."""
    head = "".join(f'<th data-key="{_e(key)}" title="click to sort">{_e(title)}</th>' for key, title in columns)
    body = "".join(
        "<tr>" + "".join(f'<td data-sort="{_e(sort)}">{_e(text)}</td>' for text, sort in row) + "</tr>"
        for row in rows)
    footer = ("<tfoot><tr>" + "".join(f"<td>{_e(text)}</td>" for text, _ in foot) + "</tr></tfoot>") if foot else ""
    return (f'<table class="sortable" id="{_e(table_id)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody>{footer}</table>")


def _layer_table(report: Report) -> str:
    represented = any(getattr(row, "representation", None) for row in report.layers)
    columns = [("name", "module"), ("type", "type"), ("parameters", "parameters"), ("nonzeros", "nonzeros"),
               ("density", "density"), ("bits", "bits")]
    if represented:
        columns.append(("representation", "representation"))
    columns += [("storage", "storage"), ("storage_share", "share of storage"), ("mults", "mults"),
                ("adds", "adds"), ("others", "others"), ("operations", "operations"), ("share", "share of operations")]
    storage = report.storage or 1.0

    def cells(row: dict) -> list[tuple[str, object]]:
        out = []
        for key, _ in columns:
            value = row["storage"] / storage if key == "storage_share" else row.get(key)
            if key == "name":
                out.append((value or ROOT, value))
            elif value is None:
                out.append(("", ""))
            elif key in ("share", "storage_share"):
                out.append((f"{value:.2%}", value))
            elif key == "density":
                out.append((f"{value:.3f}", value))
            elif key in ("parameters", "nonzeros"):
                out.append((f"{value:,}", value))
            elif isinstance(value, float):
                out.append((_number(value), value))
            else:
                out.append((str(value), value))
        return out

    rows = breakdown.module_rows(report)
    total = {**breakdown.totals(report), "name": "total"}
    return _table(columns, [cells(r) for r in rows], "layers", foot=cells(total))


def _ops_table(report: Report) -> str:
    columns = [("name", "op family"), ("calls", "calls"), ("mults", "mults"), ("adds", "adds"),
               ("others", "others"), ("operations", "operations"), ("share", "share")]
    rows = [[(r["name"], r["name"]), (f"{r['calls']:,}", r["calls"]), (_number(r["mults"]), r["mults"]),
             (_number(r["adds"]), r["adds"]), (_number(r["others"]), r["others"]),
             (_number(r["operations"]), r["operations"]), (f"{r['share']:.2%}", r["share"])]
            for r in breakdown.op_rows(report)]
    return _table(columns, rows, "ops")


def _uncounted(report: Report) -> str:
    if not report.uncounted:
        return '<p class="good" id="uncounted-none">Every op has a price in the rule set.</p>'
    columns = [("op", "op"), ("module", "module"), ("calls", "calls"), ("elements", "elements")]
    rows = [[(u.op, u.op), (u.module or ROOT, u.module), (f"{u.calls:,}", u.calls), (f"{u.elements:,}", u.elements)]
            for u in report.uncounted]
    return "<p>Ops without a price in the rule set: not counted, listed so that nothing is zero silently.</p>" + \
        _table(columns, rows, "uncounted")


def _audit(audit) -> str:
    if audit is None:
        return "<p>No audit in this report.</p>"
    parts = []
    if audit.violations:
        items = "".join(f'<li><span class="tag">{_e(v.kind)}</span> {_e(v.message)}</li>' for v in audit.violations)
        parts.append(f'<p class="bad">{len(audit.violations):,} violation(s) of the declared widths:</p>'
                     f'<ul id="violations">{items}</ul>')
    else:
        declared = [f"weights {audit.bits} bits" if audit.bits else "", f"activations {audit.act_bits} bits"
                    if audit.act_bits else ""]
        said = ", ".join(d for d in declared if d) or "nothing declared"
        parts.append(f'<p class="good" id="violations-none">The declared widths hold ({_e(said)}).</p>')
    columns = [("tensor", "tensor"), ("role", "role"), ("dtype", "dtype"), ("values", "values"),
               ("declared", "declared bits"), ("measured", "measured bits"), ("per_row", "per row"),
               ("density", "density"), ("mask", "mask")]
    rows = []
    for t in audit.tensors:
        if t.role == "buffer":
            continue
        measured = t.measured_bits if t.measured_bits is not None else f"no grid ({t.storage_bits})"
        mask = t.mask_source or ""
        if t.block_shape:
            mask = f"{mask} {t.block_source} {t.block_shape[0]}x{t.block_shape[1]} blocks".strip()
        rows.append([(t.name, t.name), (t.role, t.role), (t.dtype, t.dtype), (f"{t.numel:,}", t.numel),
                     ("" if t.declared_bits is None else str(t.declared_bits), t.declared_bits or 0),
                     (str(measured), t.measured_bits if t.measured_bits is not None else t.storage_bits),
                     ("" if t.row_bits is None else str(t.row_bits), t.row_bits or 0),
                     (f"{t.density:.1%}", t.density), (mask, mask)])
    activations = "".join(f"<li>{_e(a.name or ROOT)} ({_e(a.source)}): {a.bits} bits</li>" for a in audit.activations)
    if activations:
        parts.append(f"<p>Activation quantizers:</p><ul>{activations}</ul>")
    parts.append(f"<details><summary>Every stored tensor ({len(rows):,})</summary>"
                 f"{_table(columns, rows, 'audit-tensors')}</details>")
    return "".join(parts)


def _warnings(report: Report) -> str:
    if not report.warnings:
        return '<p class="good" id="warnings-none">No warnings.</p>'
    items = []
    for group in group_warnings(report.warnings):
        if group.count == 1:
            items.append(f"<li>{_e(group.first)}</li>")
        else:
            every = "".join(f"<li>{_e(m)}</li>" for m in group.messages)
            items.append(f"<li>{_e(group.first)}<details><summary>the same on {group.count - 1:,} more "
                         f"({_e(', '.join(group.subjects[1:4]))}{', ...' if group.count > 4 else ''})</summary>"
                         f"<ul>{every}</ul></details></li>")
    return f'<ul id="warnings">{"".join(items)}</ul>'


# --- the page ------------------------------------------------------------------------------------------------


def _headline(report: Report) -> str:
    per = report.per

    def card(key: str, label: str, shown: str, value, note: str = "", css: str = "") -> str:
        data = "" if value is None else f' data-value="{_e(repr(value))}"'
        return (f'<div class="card {css}"><div class="label">{_e(label)}</div>'
                f'<div class="value" id="total-{key}"{data}>{_e(shown)}</div><div class="note">{_e(note)}</div></div>')

    cards = [
        card("score", "score (lower is better)", f"{report.score:.6g}" if report.score is not None else "-",
             report.score, "storage / baseline + operations / baseline"),
        card("storage", "storage", _number(report.storage), report.storage, "32-bit equivalents"),
        card("parameters", "parameters", f"{report.parameters:,}", report.parameters, "raw count"),
        card("operations", f"operations per {per}", _number(report.operations), report.operations,
             f"32-bit equivalents; raw mults {_number(report.mults)}, adds {_number(report.adds)}, "
             f"others {_number(report.others)}"),
    ]
    if report.quality is not None:
        q = report.quality
        cards.append(card("quality", q.metric, f"{q.value:,.6g}", q.value if math.isfinite(q.value) else None,
                          f"threshold {q.threshold:g}"))
        cards.append(card("verdict", "verdict", q.verdict, None, "", VERDICT_CLASS[q.verdict]))
    cards.append(card("samples", f"{per}s measured", f"{report.samples:,.0f}", report.samples,
                      f"rules {report.rules}, track {report.track or '-'}"))
    return f'<div class="cards">{"".join(cards)}</div>'


_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1200px;color:#222;
padding:0 16px}
h1{font-size:1.5em;margin-bottom:4px} h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin-top:0}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #ddd;border-radius:8px;padding:10px 14px;min-width:150px}
.card .label{color:#666;font-size:.85em} .card .value{font-size:1.5em;font-weight:600}
.card .note{color:#888;font-size:.75em;max-width:260px}
.good .value,.good{color:#1a7f37} .bad .value,.bad{color:#c62828} .partial .value,.partial{color:#b26a00}
.charts{display:flex;flex-wrap:wrap;gap:8px} .chart{flex:1 1 560px;min-height:460px}
table{border-collapse:collapse;font-size:.85em;width:100%} th,td{padding:3px 8px;border-bottom:1px solid #eee}
th{cursor:pointer;background:#f6f6f6;position:sticky;top:0;text-align:left} td{text-align:right}
td:first-child,td:nth-child(2){text-align:left} tfoot td{font-weight:600;border-top:2px solid #999}
th.asc::after{content:" \\25B2"} th.desc::after{content:" \\25BC"}
.tag{background:#eee;border-radius:4px;padding:0 4px;font-size:.8em} .scroll{max-height:600px;overflow:auto}
#report-status{display:none}
"""

_SCRIPT = """
(function(){
  var status = document.getElementById('report-status');
  function fail(message){ status.setAttribute('data-status', 'error'); status.textContent = String(message); }
  window.addEventListener('error', function(e){ fail(e.message); });
  try {
    var figures = JSON.parse(document.getElementById('figures').textContent);
    var config = {displaylogo: false, responsive: true};
    var plots = Object.keys(figures).map(function(id){
      var f = figures[id];
      return Plotly.newPlot(id, f.data, f.layout, config);
    });
    Promise.all(plots).then(function(){
      // what was drawn, for checks: the modules a treemap has at the first level (tiles, however small),
      // the categories of a bar chart
      var shown = {};
      Object.keys(figures).forEach(function(id){
        var names = [];
        document.querySelectorAll('#' + id + ' g.slice').forEach(function(s){
          var d = s.__data__;
          if (d && d.depth === 1) names.push(d.data.data.id);
        });
        document.querySelectorAll('#' + id + ' .ytick text').forEach(function(t){ names.push(t.textContent); });
        shown[id] = names;
      });
      status.setAttribute('data-shown', JSON.stringify(shown));
      status.setAttribute('data-status', 'rendered');
    }, fail);
  } catch (e) { fail(e); }
  document.querySelectorAll('table.sortable th').forEach(function(th){
    th.addEventListener('click', function(){
      var table = th.closest('table'), body = table.tBodies[0], index = th.cellIndex;
      var ascending = th.classList.contains('desc');  // largest first on the first click
      table.querySelectorAll('th').forEach(function(h){ h.classList.remove('asc', 'desc'); });
      th.classList.add(ascending ? 'asc' : 'desc');
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function(a, b){
        var x = a.cells[index].getAttribute('data-sort'), y = b.cells[index].getAttribute('data-sort');
        var nx = parseFloat(x), ny = parseFloat(y), order;
        if (!isNaN(nx) && !isNaN(ny) && isFinite(x) && isFinite(y)) order = nx - ny;
        else order = x < y ? -1 : x > y ? 1 : 0;
        return ascending ? order : -order;
      });
      rows.forEach(function(r){ body.appendChild(r); });
    });
  });
})();
"""


def render_html(report: Report, title: str = "micronet-score report", audit=None, rules=None) -> str:
    """The page as a string. ``audit`` (an :class:`~micronet_score.audit.AuditReport`) adds its findings;
    ``rules`` (the rule set the report was counted by; loaded by the report's rule-set name when None) gives each
    module's part of the score."""
    try:
        import plotly.offline
    except ImportError:
        raise MicronetError("the HTML report needs plotly: pip install 'micronet-score[report]'") from None
    if rules is None:
        from micronet_score.ruleset import load_rules

        try:
            rules = load_rules(report.rules)
        except MicronetError:
            rules = None  # a rule file that is not at hand: the score bars are left out
    treemap_layout = {"margin": {"l": 4, "r": 4, "t": 34, "b": 4}, "height": 460}
    figures = {
        "storage-chart": {"data": [_tree(report, "storage")],
                          "layout": {**treemap_layout, "title": {"text": "storage (32-bit equivalents)"}}},
        "operations-chart": {"data": [_tree(report, "operations")],
                             "layout": {**treemap_layout,
                                        "title": {"text": f"operations per {report.per} (32-bit equivalents)"}}},
    }
    bars = _score_bars(report, rules)
    if bars is not None and report.track is not None:
        figures["score-chart"] = bars
    charts = "".join(f'<div class="chart" id="{key}"></div>' for key in figures if key != "score-chart")
    score_section = ('<h3>Each top-level module\'s part of the score</h3><div id="score-chart"></div>'
                     if "score-chart" in figures else "")
    warnings = len(report.warnings)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<meta name="generator" content="micronet-score ({_e(report.schema)})">
<style>{_STYLE}</style></head>
<body>
<div id="report-status" data-status="pending"></div>
<h1>{_e(title)}</h1>
<p class="sub">rules {_e(report.rules)} &middot; track {_e(report.track or '-')} &middot; operations averaged per
{_e(report.per)} over {report.samples:,.0f} {_e(report.per)}s &middot; schema {_e(report.schema)}</p>
{_headline(report)}
<h2>Where the score goes</h2>
<p>Each tile is a module, its area its share; click a tile to open it, the bar above the chart to go back.</p>
<div class="charts">{charts}</div>
{score_section}
<h2>Per layer</h2>
<p>Click a column to sort. Storage in 32-bit equivalents (masks included); operations per {_e(report.per)} in
32-bit equivalents; mults, adds and others are raw counts.</p>
<div class="scroll">{_layer_table(report)}</div>
<h2>Op families</h2>
<div class="scroll">{_ops_table(report)}</div>
<h2>Audit: declared and measured bits and sparsity</h2>
{_audit(audit)}
<h2>Uncounted ops</h2>
{_uncounted(report)}
<h2>Warnings ({warnings:,})</h2>
{_warnings(report)}
<script type="application/json" id="figures">{_script_json(figures)}</script>
<script>{plotly.offline.get_plotlyjs()}</script>
<script>{_SCRIPT}</script>
</body></html>
"""


def write_html(report: Report, path: str | Path, title: str = "micronet-score report", audit=None,
               rules=None) -> Path:
    """Write the page to ``path`` (UTF-8) and return the path."""
    path = Path(path)
    path.write_text(render_html(report, title=title, audit=audit, rules=rules), encoding="utf-8")
    return path
