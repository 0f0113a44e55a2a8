"""The HTML report of the demo, opened in a real headless Chromium: it renders without console errors, shows the
same totals as `eval --json`, its charts have one element per top-level module, and its screenshot is not blank.
JSON, CSV, Markdown and HTML give the same numbers under the same names.

Without a Chromium the browser tests skip (saying why); .ci/run installs Debian's chromium and sets
MICRONET_SCORE_BROWSER=required, which turns a missing browser into a failure there.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from micronet_score.models.mit_lm import demo_paths

CKPT, CONFIG, DATA = demo_paths()
BROWSER = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
REQUIRED = os.environ.get("MICRONET_SCORE_BROWSER") == "required"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=10000")


def _browser() -> str:
    if BROWSER is None:
        if REQUIRED:
            pytest.fail("MICRONET_SCORE_BROWSER=required but no chromium is installed")
        pytest.skip("no chromium on this machine: the browser checks of the HTML report need one "
                    "(apt-get install chromium; .ci/run installs it)")
    return BROWSER


def _chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Run headless Chromium on a file with a fresh profile, no network services."""
    command = [_browser(), *FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's report page (written by the CLI) and its `eval --json`."""
    from typer.testing import CliRunner

    from micronet_score.cli import app

    folder = tmp_path_factory.mktemp("report")
    page = folder / "demo.html"
    result = CliRunner().invoke(app, ["report", "-o", str(page)])
    assert result.exit_code == 0, result.stderr
    evaluated = CliRunner().invoke(app, ["eval", "--json"])
    assert evaluated.exit_code == 0, evaluated.stderr
    return page, json.loads(evaluated.stdout), folder


@pytest.fixture(scope="module")
def rendered(demo):
    """The page's DOM after its scripts ran, and Chromium's log."""
    page, _, folder = demo
    run = _chromium(page, folder / "profile-dom", "--dump-dom")
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout, run.stderr


def _top_level(report: dict, quantity: str) -> set[str]:
    """Top-level modules (first path component) with a nonzero total of a quantity."""
    totals: dict[str, float] = {}
    for row in report["layers"]:
        if row["name"]:
            key = row["name"].split(".")[0]
            totals[key] = totals.get(key, 0.0) + row[quantity]
    return {key for key, value in totals.items() if value > 0}


def test_page_is_one_file_with_no_network_reference(demo):
    import plotly.offline

    text = demo[0].read_text(encoding="utf-8")
    library = plotly.offline.get_plotlyjs()
    assert library in text  # plotly.js itself is inline
    markup = text.replace(library, "")
    # nothing else is loaded from anywhere: no script, stylesheet, image or frame with a source
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", markup)
    assert "http://" not in markup and "https://" not in markup


def test_renders_without_console_errors(rendered):
    dom, log = rendered
    status = re.search(r'<div id="report-status"[^>]*data-status="([^"]+)"', dom)
    assert status is not None and status.group(1) == "rendered", dom[:2000]
    console = [line for line in log.splitlines() if "CONSOLE" in line]
    assert console == []  # the page logs nothing: any console line is an error or a warning


def test_shows_the_same_totals_as_eval_json(rendered, demo):
    dom, _ = rendered
    report = demo[1]
    for key in ("score", "storage", "operations", "parameters", "samples"):
        shown = re.search(rf'id="total-{key}" data-value="([^"]+)"', dom)
        assert shown is not None, key
        assert float(html.unescape(shown.group(1))) == pytest.approx(report[key], rel=1e-12), key
    assert re.search(r'id="total-verdict"[^>]*>([^<]+)<', dom).group(1) == report["quality"]["verdict"]
    assert f"{report['parameters']:,}" in dom


def test_charts_have_one_element_per_top_level_module(rendered, demo):
    dom, _ = rendered
    report = demo[1]
    status = re.search(r'<div id="report-status"[^>]*data-shown="([^"]+)"', dom)
    shown = json.loads(html.unescape(status.group(1)))
    assert sorted(shown["storage-chart"]) == sorted(_top_level(report, "storage"))
    assert sorted(shown["operations-chart"]) == sorted(_top_level(report, "operations"))
    # the score bars: every top-level module with storage or operations, and the root's own ops as <model>
    either = _top_level(report, "storage") | _top_level(report, "operations")
    root = next(r for r in report["layers"] if r["name"] == "")
    assert sorted(shown["score-chart"]) == sorted(either | ({"<model>"} if root["operations"] > 0 else set()))
    assert {"embed", "layers", "loss"} <= either


def test_screenshot_is_not_blank(demo):
    from PIL import Image, ImageStat

    page, _, folder = demo
    shot = folder / "demo.png"
    run = _chromium(page, folder / "profile-shot", "--window-size=1280,1600", f"--screenshot={shot}")
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1600)
    variance = ImageStat.Stat(image.convert("L")).var[0]
    assert variance > 500  # a blank page has none; the demo's treemaps and tables give thousands
    colours = image.resize((128, 160)).getcolors(maxcolors=128 * 160)
    assert len(colours) > 20


def test_table_rows_are_the_layers_with_their_numbers(demo):
    text = demo[0].read_text(encoding="utf-8")
    report = demo[1]
    table = text[text.index('<table class="sortable" id="layers">'):]
    table = table[:table.index("</table>")]
    body = table[table.index("<tbody>"):table.index("</tbody>")]
    rows = re.findall(r"<tr>(.*?)</tr>", body)
    assert len(rows) == len(report["layers"])
    header = re.findall(r'<th data-key="([^"]+)"', table)
    for row, layer in zip(rows, report["layers"], strict=True):
        sorts = [html.unescape(v) for v in re.findall(r'data-sort="([^"]*)"', row)]
        cells = dict(zip(header, sorts, strict=True))
        assert cells["name"] == layer["name"]
        assert int(cells["parameters"]) == layer["parameters"]
        assert float(cells["storage"]) == layer["storage"]
        assert float(cells["operations"]) == layer["operations"]


def test_every_format_gives_the_same_numbers_under_the_same_names(cli, demo, tmp_path):
    """eval --json, breakdown CSV / Markdown / JSON and the HTML page: one set of names, the same totals."""
    report = demo[1]
    common = ("breakdown", str(CKPT), "--config", str(CONFIG), "--data", str(DATA))
    code, out, err = cli(*common, "--format", "csv")
    assert code == 0, err
    csv_total = list(csv.DictReader(io.StringIO(out)))[-1]
    code, md, err = cli(*common, "--format", "md")
    assert code == 0, err
    lines = md.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    md_total = dict(zip(header, [c.strip() for c in lines[-1].strip("|").split("|")], strict=True))
    code, out, err = cli(*common, "--format", "json")
    assert code == 0, err
    json_total = json.loads(out)["total"]
    for names in (csv_total, md_total, json_total):
        assert {"parameters", "storage", "operations"} <= set(names)
        assert int(names["parameters"]) == report["parameters"]
        assert float(names["storage"]) == pytest.approx(report["storage"], rel=1e-12)
        assert float(names["operations"]) == pytest.approx(report["operations"], rel=1e-12)
    page = demo[0].read_text(encoding="utf-8")
    for name in ("parameters", "storage", "operations"):
        assert f'<th data-key="{name}"' in page


def test_numbered_modules_are_categories_not_numbers(tmp_path):
    """nn.Sequential names its modules 0, 1, 2...: each is still one tile and one bar of its own."""
    import torch
    from torch import nn

    import micronet_score as ms
    from micronet_score.html_report import write_html

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    report = ms.count(model, torch.randn(1, 3, 8, 8), track="cifar100")
    page = write_html(report, tmp_path / "seq.html")
    run = _chromium(page, tmp_path / "profile", "--dump-dom")
    status = re.search(r'<div id="report-status"[^>]*data-status="([^"]+)"[^>]*data-shown="([^"]+)"', run.stdout)
    assert status is not None and status.group(1) == "rendered", run.stdout[:2000]
    shown = json.loads(html.unescape(status.group(2)))
    data = report.model_dump()
    assert sorted(shown["storage-chart"]) == ["0", "3"]  # the conv and the linear layer store weights
    assert sorted(shown["operations-chart"]) == sorted(_top_level(data, "operations"))
    assert sorted(shown["score-chart"]) == sorted(_top_level(data, "storage") | _top_level(data, "operations"))
