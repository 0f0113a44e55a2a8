"""Words that mean one thing everywhere, verdicts that do not mislead, warnings people read, pictures, help.

- schema-1 reports (``params`` = storage, ``flops`` = operations; layer ``params`` = the raw count) still parse;
- a partial evaluation is "partial run: not a verdict";
- settings a checkpoint does not give are named when they are assumed;
- the same finding on many tensors is one line; --verbose lists all;
- --format svg/png and compare --plot draw pictures; help shows flags as flags.
"""

from __future__ import annotations

import io
import json
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
import torch
from micronet_score.models.mit_lm import demo_paths

from micronet_score.report import SCHEMA, Report

CKPT, CONFIG, DATA = demo_paths()
SCHEMA1 = Path(__file__).parent / "fixtures" / "demo_eval_schema1.json"
"""`micronet-score eval --json` of the demo, written by the schema-1 code (commit f685306)."""


def test_a_schema1_report_parses_with_its_meanings():
    old = json.loads(SCHEMA1.read_text())
    assert old["schema"] == "micronet-score/1" and "storage" not in old
    report = Report.model_validate_json(SCHEMA1.read_text())
    assert report.storage == old["params"] and report.operations == old["flops"]
    # schema 1 had no raw count in the report: the sum of the layers' (whose "params" was the raw count)
    assert report.parameters == sum(layer["params"] for layer in old["layers"]) > 0
    for row, layer in zip(report.layers, old["layers"], strict=True):
        assert row.parameters == layer["params"] and row.storage == layer["storage"]
        assert row.operations == layer["flops"]
    assert report.family("dot_product").operations == next(o["flops"] for o in old["ops"] if o["family"] ==
                                                          "dot_product")
    # the old Python names still read the same numbers
    assert report.params == report.storage and report.flops == report.operations
    assert report.layers[2].params == report.layers[2].parameters


def test_new_json_has_the_new_names_and_the_old_ones_for_one_release():
    report = Report.model_validate_json(SCHEMA1.read_text()).model_copy(update={"schema": SCHEMA})
    data = json.loads(report.model_dump_json())
    assert data["schema"] == "micronet-score/2"
    assert data["storage"] == data["params"] and data["operations"] == data["flops"]
    assert data["layers"][2]["parameters"] == data["layers"][2]["params"]
    assert Report.model_validate(data) == report


def test_old_keyword_names_still_build_a_report():
    from micronet_score.report import LayerRow, OpTotal

    row = LayerRow(name="fc", type="Linear", params=6, nonzeros=6, density=1.0, bits=32, storage=6.0, mults=6,
                   adds=4, others=0, flops=10.0, share=1.0)
    op = OpTotal(family="dot_product", calls=1, mults=6, adds=4, others=0, flops=10.0)
    report = Report(rules="micronet-2019", samples=1, per="sample", params=6.0, flops=10.0, mults=6, adds=4,
                    others=0, layers=[row], ops=[op])
    assert (report.parameters, report.storage, report.operations) == (6, 6.0, 10.0)
    assert op.operations == 10.0 and row.parameters == 6


def test_partial_run_is_not_a_verdict(cli):
    code, out, err = cli("eval", "--limit-tokens", "300", "--json")
    assert code == 0, err
    quality = json.loads(out)["quality"]
    assert quality["complete"] is False and quality["qualifies"] is False
    assert quality["verdict"] == "partial run: not a verdict"
    code, out, err = cli("eval", "--limit-tokens", "300")
    assert code == 0, err
    assert "partial run: not a verdict" in out and "does not qualify" not in out
    assert "perplexity over the first 300" in err


def test_settings_assumed_without_a_config_are_named():
    from micronet_score.models.mit_lm import MitLMConfig

    from micronet_score.checkpoint import load_model
    from micronet_score.cli import _assumed_noted

    bare = load_model(CKPT)
    # the demo's file holds shapes only: the cache and bits come from the best configuration's defaults
    assert bare.meta["assumed"]["n_cache"] == MitLMConfig().n_cache == 3000
    assert {"use_cache", "n_cache", "bits"} <= set(bare.meta["assumed"])
    assert "n_layers" not in bare.meta["assumed"]  # the shapes say it
    with_config = load_model(CKPT, config=CONFIG)
    assert with_config.meta["assumed"] == {}
    report = Report(rules="micronet-2019", samples=1, per="token", params=1.0, flops=1.0, mults=0, adds=0, others=1)
    warning = _assumed_noted(bare, report).warnings[0]
    assert "settings assumed" in warning and "n_cache=3000" in warning and "--config" in warning
    assert _assumed_noted(with_config, report).warnings == []


def test_the_same_finding_on_many_tensors_is_one_line():
    from micronet_score.audit import audit
    from micronet_score.checkpoint import load_model
    from micronet_score.warning_groups import group_warnings, warning_lines

    loaded = load_model(CKPT, config=CONFIG)
    found = audit(loaded.model, bits=8)
    warnings = [f"audit: {v.message}" for v in found.violations]
    biases = [w for w in warnings if re.match(r"audit: \S+\.bias: ", w)]
    assert len(biases) >= 4  # the demo's 9-bit biases declared as 8 bits: one finding per bias tensor
    lines = warning_lines(warnings)
    assert len(lines) < len(warnings)
    bias_lines = [line for line in lines if re.match(r"audit: \S+\.bias: ", line)]
    assert len(bias_lines) == 1 and f"the same on {len(biases) - 1} more" in bias_lines[0]
    assert sum(group.count for group in group_warnings(warnings)) == len(warnings)
    assert warning_lines(warnings, verbose=True) == warnings


def test_unrelated_warnings_stay_apart():
    from micronet_score.warning_groups import warning_lines

    warnings = ["perplexity over the first 300 of 12,970 predictions only: not the official figure",
                "meta tensors have no values: their density is unknown, so weights are counted dense"]
    assert warning_lines(warnings) == warnings


def _pruned_demo(folder: Path) -> Path:
    """The demo with the smaller half of every feed-forward weight set to zero (a compression-sweep point)."""
    checkpoint = torch.load(CKPT, weights_only=True)
    for key, tensor in checkpoint["net"].items():
        if ".fc." in key and key.endswith(".weight"):
            tensor[tensor.abs() < tensor.abs().median()] = 0
    path = folder / "pruned.pth"
    torch.save(checkpoint, path)
    return path


def test_breakdown_svg_names_every_top_level_module(cli):
    code, out, err = cli("breakdown", str(CKPT), "--config", str(CONFIG), "--format", "svg")
    assert code == 0, err
    root = ElementTree.fromstring(out)
    texts = {"".join(t.itertext()).strip() for t in root.iter("{http://www.w3.org/2000/svg}text")}
    assert {"layers", "loss", "embed"} <= texts
    assert any(t.startswith("part of the score") for t in texts)


def test_breakdown_png_is_a_picture(cli, tmp_path):
    from PIL import Image, ImageStat

    target = tmp_path / "chart.png"
    code, _, err = cli("breakdown", str(CKPT), "--config", str(CONFIG), "--format", "png", "-o", str(target))
    assert code == 0, err
    image = Image.open(target).convert("L")
    assert image.width > 300 and ImageStat.Stat(image).var[0] > 100


def test_compare_plots_score_against_quality_with_the_threshold(cli, tmp_path):
    pruned = _pruned_demo(tmp_path)
    target = tmp_path / "tradeoff.svg"
    code, out, err = cli("compare", str(CKPT), str(pruned), "--config", str(CONFIG), "--data", str(DATA),
                         "--limit-tokens", "200", "--plot", str(target), "--json")
    assert code == 0, err
    reports = json.loads(out)
    dense, sparse = reports[str(CKPT)], reports[str(pruned)]
    assert sparse["storage"] < dense["storage"]  # the zeros are not stored
    root = ElementTree.fromstring(target.read_text())
    texts = {"".join(t.itertext()).strip() for t in root.iter("{http://www.w3.org/2000/svg}text")}
    assert "wikitext103 threshold: perplexity <= 35" in texts
    assert {CKPT.name, pruned.name} <= texts


def test_compare_plot_needs_data(cli, tmp_path):
    code, _, err = cli("compare", str(CKPT), str(CKPT), "--plot", str(tmp_path / "x.svg"))
    assert code == 2 and "--data" in err


@pytest.mark.parametrize("command", ["", "eval", "count", "breakdown", "compare", "report", "audit", "rules"])
def test_help_shows_flags_as_flags(cli, command):
    code, out, _ = cli(*([command] if command else []), "--help")
    assert code == 0
    assert "<bool>" not in out
    assert "--help" in out


def test_report_from_the_python_api(tmp_path):
    from micronet_score.html_report import write_html

    report = Report.model_validate_json(SCHEMA1.read_text())
    page = write_html(report, tmp_path / "r.html", title="<demo & co>")
    text = page.read_text(encoding="utf-8")
    assert "&lt;demo &amp; co&gt;" in text and "<demo & co>" not in text
    assert f'id="total-storage" data-value="{report.storage!r}"' in text
    assert text == report.to_html(title="<demo & co>")
    assert io.StringIO(text).readline().startswith("<!DOCTYPE html>")
