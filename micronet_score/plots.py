"""Static pictures for papers (SVG or PNG, drawn with matplotlib): where a model's score goes per module, and score
against quality for several checkpoints with the track's threshold.

The interactive page (``html_report``) uses plotly; these are files to put in a paper or a README, written
without a browser. Matplotlib is an optional dependency (``pip install 'micronet-score[report]'``).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from micronet_score import breakdown
from micronet_score.errors import MicronetError
from micronet_score.report import Report

ImageFormat = Literal["svg", "png"]
STORAGE_COLOUR, OPERATIONS_COLOUR = "#4c78a8", "#f58518"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MicronetError("pictures need matplotlib: pip install 'micronet-score[report]'") from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.hashsalt"] = "micronet-score"  # the same SVG for the same report
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: searchable and editable
    return plt


def _save(figure, fmt: ImageFormat) -> bytes:
    out = io.BytesIO()
    metadata = {"Date": None} if fmt == "svg" else {}
    figure.savefig(out, format=fmt, dpi=150, bbox_inches="tight", metadata=metadata)
    return out.getvalue()


def breakdown_image(report: Report, rules, depth: int | None = 1, top: int | None = 12,
                    fmt: ImageFormat = "svg") -> bytes:
    """Horizontal bars, one per module (paths summed to ``depth``): its part of the score, the storage term
    (storage / baseline storage) and the operations term (operations / baseline operations) stacked; without a
    track, its shares of the model's storage and operations. The ``top`` largest modules are drawn, the rest summed
    into one bar, so that the bars still add up to the score."""
    plt = _pyplot()
    parts = sorted(breakdown.score_parts(report, rules, depth), key=lambda p: -(p["storage"] + p["operations"]))
    parts = [p for p in parts if p["storage"] or p["operations"]]
    if top is not None and len(parts) > top:
        rest = parts[top - 1:]
        parts = parts[:top - 1] + [{"name": f"{len(rest)} others", "storage": sum(p["storage"] for p in rest),
                                    "operations": sum(p["operations"] for p in rest)}]
    parts.reverse()  # the largest at the top
    names = [p["name"] or "<root>" for p in parts]
    storage = [p["storage"] for p in parts]
    operations = [p["operations"] for p in parts]
    figure, axes = plt.subplots(figsize=(7, 0.9 + 0.36 * len(parts)))
    if report.track is not None:
        labels = ("storage / baseline storage", "operations / baseline operations")
        axes.set_xlabel(f"part of the score (total {report.score:.4g}; {report.rules}, {report.track})")
    else:
        labels = ("share of storage", "share of operations")
        axes.set_xlabel("share of the model (no track: no score)")
    axes.barh(names, storage, color=STORAGE_COLOUR, label=labels[0])
    axes.barh(names, operations, left=storage, color=OPERATIONS_COLOUR, label=labels[1])
    total = (report.score if report.track is not None else 2.0) or 1.0
    for y, (s, o) in enumerate(zip(storage, operations, strict=True)):
        share = (s + o) / total
        axes.text(s + o, y, f" {share:.1%}" if share >= 0.0005 or share == 0 else " <0.1%", va="center", fontsize=8)
    axes.margins(x=0.15)
    axes.legend(loc="lower right", fontsize=8, frameon=False)
    axes.set_title(f"Where the score goes (storage {report.storage:,.0f}, operations per {report.per} "
                   f"{report.operations:,.0f}; 32-bit equivalents)", fontsize=9)
    axes.spines[["top", "right"]].set_visible(False)
    try:
        return _save(figure, fmt)
    finally:
        plt.close(figure)


VERDICT_COLOUR = {"qualifies": "#1a7f37", "does not qualify": "#c62828", "partial run: not a verdict": "#b26a00"}


@dataclass(frozen=True)
class Point:
    """One checkpoint of a trade-off plot: its score, quality value and verdict (``Quality.verdict``)."""

    name: str
    score: float
    quality: float
    verdict: str


def tradeoff_image(points: Sequence[Point], track, track_name: str, fmt: ImageFormat = "svg") -> bytes:
    """Score (x, lower is better) against the quality metric (y) for several checkpoints, with the track's
    quality threshold drawn (``track``: the rule set's :class:`~micronet_score.ruleset.Track`): the trade-off a
    compression sweep explores. Points are coloured by their verdict."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    for verdict, colour in VERDICT_COLOUR.items():
        mine = [p for p in points if p.verdict == verdict]
        if mine:
            axes.scatter([p.score for p in mine], [p.quality for p in mine], color=colour, zorder=3, label=verdict)
    for point in points:
        axes.annotate(Path(point.name).name, (point.score, point.quality), textcoords="offset points",
                      xytext=(5, 4), fontsize=8)
    better = "lower" if track.comparison.value in ("le", "lt") else "higher"
    axes.axhline(track.threshold, color="#555555", linestyle="--", linewidth=1)
    axes.annotate(f"{track_name} threshold: {track.metric} {track.comparison.symbol} {track.threshold:g}",
                  xy=(0.01, track.threshold), xycoords=("axes fraction", "data"), xytext=(0, 4),
                  textcoords="offset points", fontsize=8, color="#555555")
    axes.set_xlabel("score (lower is better)")
    axes.set_ylabel(f"{track.metric} ({better} is better)")
    axes.set_title(f"Score against {track.metric}", fontsize=10)
    axes.legend(fontsize=8, frameon=False)
    axes.margins(x=0.2, y=0.15)
    axes.spines[["top", "right"]].set_visible(False)
    try:
        return _save(figure, fmt)
    finally:
        plt.close(figure)


def image_format(path: str | Path, default: ImageFormat = "svg") -> ImageFormat:
    """svg or png from a file name's suffix."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix in ("svg", "png"):
        return suffix  # type: ignore[return-value]
    if suffix:
        raise MicronetError(f"{path}: pictures are .svg or .png files")
    return default
