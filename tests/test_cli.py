"""The real CLI on generated checkpoints of every accepted kind: eval, count, breakdown, compare, models, schema."""

import csv
import io
import json
from pathlib import Path

import jsonschema
import pytest
import torch
from micronet_score.models import registry
from micronet_score.models.mit_lm import demo_paths
from torch import nn

from micronet_score.checkpoint import save_checkpoint

CKPT, CONFIG, DATA = demo_paths()
SMALL_WRN = {"depth": 10, "widen": 1, "num_classes": 10}


def _json(cli, *args):
    code, out, err = cli(*args)
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def demo_eval():
    from typer.testing import CliRunner

    from micronet_score.cli import app

    result = CliRunner().invoke(app, ["eval", "--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_eval_without_arguments_scores_the_demo(demo_eval):
    assert demo_eval["track"] == "wikitext103" and demo_eval["per"] == "token"
    quality = demo_eval["quality"]
    assert quality["metric"] == "perplexity" and quality["threshold"] == 35
    assert quality["qualifies"] == (quality["value"] <= 35)
    # score = storage / 159e6 + operations / 318e6 (the track's baselines)
    assert demo_eval["score"] == pytest.approx(demo_eval["storage"] / 159e6 + demo_eval["operations"] / 318e6)
    assert demo_eval["uncounted"] == []
    assert demo_eval["conversions"] > 0  # the 9-bit activation quantizers


def test_eval_of_a_checkpoint_without_data_is_refused_before_loading_it(cli, tmp_path):
    code, out, err = cli("eval", str(tmp_path / "never-read.pt"))
    assert code == 2 and out == ""
    assert "eval needs the test data (--data)" in err and "never-read" not in err


def test_report_validates_against_the_published_schema(cli, demo_eval):
    schema = _json(cli, "schema")
    jsonschema.validate(demo_eval, schema)
    for key in ("schema", "rules", "track", "parameters", "storage", "operations", "params", "flops", "mults",
                "adds", "score", "quality", "layers", "uncounted"):
        assert key in schema["properties"]


def test_breakdown_totals_equal_eval_totals(cli, demo_eval):
    code, out, err = cli("breakdown", str(CKPT), "--config", str(CONFIG), "--data", str(DATA), "--format", "csv")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    total = rows[-1]
    assert total["name"] == "total"
    assert float(total["storage"]) == pytest.approx(demo_eval["storage"], rel=1e-12)
    assert float(total["operations"]) == pytest.approx(demo_eval["operations"], rel=1e-12)
    assert int(total["parameters"]) == demo_eval["parameters"]
    assert sum(float(r["operations"]) for r in rows[:-1]) == pytest.approx(float(total["operations"]))


def test_breakdown_markdown_and_json_parse_back(cli):
    common = ("breakdown", str(CKPT), "--config", str(CONFIG), "--by", "op")
    code, md, _ = cli(*common, "--format", "md")
    assert code == 0
    lines = md.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    as_json = _json(cli, *common, "--format", "json")
    assert [cells[0] for cells in body] == [r["name"] for r in as_json["rows"]] + ["total"]
    operations = header.index("operations")
    assert [float(cells[operations]) for cells in body[:-1]] == [r["operations"] for r in as_json["rows"]]
    assert float(body[-1][operations]) == as_json["total"]["operations"]


def test_breakdown_table_depth_sort_top(cli):
    code, out, _ = cli("breakdown", str(CKPT), "--config", str(CONFIG), "--depth", "1", "--sort", "ops", "--top", "2")
    assert code == 0 and "total" in out


def test_count_demo_counts_the_example_stream(cli):
    from micronet_score.checkpoint import load_model

    loaded = load_model(CKPT, config=CONFIG)
    tokens = registry.get("mit-lm").example_inputs(loaded.model)[0]
    report = _json(cli, "count", str(CKPT), "--config", str(CONFIG), "--json")
    assert report["quality"] is None and report["samples"] == tokens.numel()


def _small_wrn(tmp_path, name="wrn.pt", sparsity=0.0):
    torch.manual_seed(0)
    net = registry.get("wrn-28-10").build(SMALL_WRN)
    if sparsity:
        with torch.no_grad():
            for p in net.parameters():
                if p.dim() > 1:
                    p.mul_((torch.rand_like(p) >= sparsity).float())
    return save_checkpoint(tmp_path / name, "wrn-28-10", SMALL_WRN, net.state_dict())


def test_count_self_describing_checkpoint(cli, tmp_path):
    report = _json(cli, "count", str(_small_wrn(tmp_path)), "--json")
    assert report["track"] == "cifar100" and report["per"] == "sample" and report["samples"] == 1
    assert report["score"] == pytest.approx(report["storage"] / 36.5e6 + report["operations"] / 10.49e9)


def test_count_raw_state_dict_needs_and_takes_model(cli, tmp_path):
    raw = tmp_path / "raw.pt"
    torch.save(torch.load(CKPT, weights_only=True)["net"], raw)
    report = _json(cli, "count", str(raw), "--model", "mit-lm", "--config", str(CONFIG), "--json")
    again = _json(cli, "count", str(CKPT), "--config", str(CONFIG), "--json")
    assert report["storage"] == again["storage"] and report["operations"] == again["operations"]


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_count_torch_export_program(cli, tmp_path):
    program = torch.export.export(TinyNet().eval(), (torch.randn(2, 3, 8, 8),))
    path = tmp_path / "tiny.pt2"
    torch.export.save(program, path)
    report = _json(cli, "count", str(path), "--track", "cifar100", "--json")
    # per image: conv 4 outputs/pixel x 64 pixels, each a 27-term dot product; fc 10 x 4 terms
    assert report["samples"] == 2
    dot = next(op for op in report["ops"] if op["family"] == "dot_product")
    assert dot["mults"] == 4 * 64 * 27 + 10 * 4


class Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_pickled_model_needs_trust_and_never_runs_code(cli, tmp_path):
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "pwned"
    torch.save({"net": Evil(str(marker))}, evil)
    code, out, err = cli("count", str(evil))
    assert code == 2 and not marker.exists()
    assert "--trust-pickle" in " ".join(err.split()) and "Traceback" not in out + err


def test_pickled_module_with_trust_pickle(cli, tmp_path):
    path = tmp_path / "module.pt"
    torch.save(TinyNet(), path)
    code, _, err = cli("count", str(path), "--json")
    assert code == 2 and "--trust-pickle" in " ".join(err.split())
    code, out, err = cli("count", str(path), "--trust-pickle", "--json")
    err = " ".join(err.split())  # a pickled module carries no example input: the error says how to give one
    assert code == 2 and "no example input" in err and "--input 1x3x32x32" in err and "--data" in err
    # an image track gives one image of its input shape (3x32x32 for cifar100): conv 4*32*32 outputs of 27 MACs
    report = _json(cli, "count", str(path), "--trust-pickle", "--track", "cifar100", "--json")
    assert report["layers"][1]["name"] == "conv" and report["layers"][1]["mults"] == 4 * 32 * 32 * 27


def test_compare_dense_and_pruned(cli, tmp_path):
    dense, pruned = _small_wrn(tmp_path, "dense.pt"), _small_wrn(tmp_path, "pruned.pt", sparsity=0.9)
    data = _json(cli, "compare", str(dense), str(pruned), "--json")
    a, b = data[str(dense)], data[str(pruned)]
    assert b["storage"] < a["storage"] and b["operations"] < a["operations"]
    code, out, _ = cli("compare", str(dense), str(pruned))
    assert code == 0 and "%" in out


def test_models_lists_the_bundled_architectures(cli):
    names = {m["name"] for m in _json(cli, "models", "--json")}
    assert {"mit-lm", "wrn-28-10", "mobilenet-v2", "lstm-baseline", "jaist-qrnn"} <= names


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("count", "nope.pt"), "checkpoint not found"),
        (("eval", "nope.pt", "--data", "."), "checkpoint not found"),
        (("count", str(CKPT), "--model", "nope"), "no bundled model 'nope'"),
        (("eval", str(CKPT), "--config", str(CONFIG), "--data", "/nonexistent"), "/nonexistent"),
        (("eval", str(CKPT), "--config", str(CONFIG), "--rules", "nope.toml"), "nope.toml"),
        (("count", str(CKPT), "--config", str(CONFIG), "--track", "mnist"), "mnist"),
    ],
)
def test_errors_are_one_line_and_exit_2(cli, args, needle):
    code, out, err = cli(*args)
    assert code == 2, out
    assert needle in " ".join(err.split()) and "Traceback" not in out + err


def test_empty_checkpoint_file(cli, tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    code, _, err = cli("count", str(tmp_path / "empty.pt"))
    assert code == 2 and "empty file" in err


def test_audit_command_on_the_demo(cli):
    code, out, _ = cli("audit", str(CKPT), "--config", str(CONFIG), "--bits", "9")
    assert code == 0 and "the declared widths hold" in out
    data = _json(cli, "audit", str(CKPT), "--config", str(CONFIG), "--bits", "8", "--json")
    assert data["violations"] and all("9 bits" in v["message"] for v in data["violations"])
    code, _, err = cli("audit", str(CKPT), "--config", str(CONFIG), "--bits", "8", "--strict")
    assert code == 2 and "do not hold" in err


def test_count_with_declared_bits_runs_the_audit(cli, tmp_path):
    path = str(_small_wrn(tmp_path))
    report = _json(cli, "count", path, "--bits", "8", "--json")
    assert any(w.startswith("audit:") and "declared as 8 bits" in w for w in report["warnings"])
    code, _, err = cli("count", path, "--bits", "8", "--strict")
    assert code == 2 and "declared as 8 bits" in err
    assert not any(w.startswith("audit:") for w in _json(cli, "count", path, "--json")["warnings"])


def test_count_shape_only_gives_the_same_totals(cli, tmp_path):
    path = str(_small_wrn(tmp_path, sparsity=0.5))
    real = _json(cli, "count", path, "--json")
    shapes = _json(cli, "count", path, "--shape-only", "--json")
    for key in ("parameters", "storage", "operations", "mults", "adds", "others", "score"):
        assert shapes[key] == real[key]
    code, _, err = cli("count", str(CKPT), "--config", str(CONFIG), "--shape-only")
    assert code == 2 and "shape_only" in " ".join(err.split())


def test_eval_image_model_on_a_cifar_archive(cli, tmp_path):
    from test_images import cifar_pickle, planted

    from micronet_score.data.images import load_cifar100_test

    labels, right = planted(20, 5)
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "test").write_bytes(cifar_pickle(labels, right))
    config = {"depth": 10, "widen": 1, "num_classes": 100}
    torch.manual_seed(0)
    net = registry.get("wrn-28-10").build(config).eval()
    path = save_checkpoint(tmp_path / "wrn.pt", "wrn-28-10", config, net.state_dict())
    report = _json(cli, "eval", str(path), "--data", str(tmp_path / "cifar-100-python"), "--json")
    # independent reference: the same model run directly on the decoded, normalised images
    images = load_cifar100_test(tmp_path / "cifar-100-python")
    with torch.no_grad():
        batch, batch_labels = next(images.batches(20))
        correct = int((net(batch).argmax(-1) == batch_labels).sum())
    assert report["quality"]["value"] == correct and report["quality"]["threshold"] == 8000
    assert report["quality"]["qualifies"] is False and report["samples"] == 20
    one = _json(cli, "count", str(path), "--json")  # one example image: per-image work is the same
    assert report["mults"] == pytest.approx(one["mults"]) and report["storage"] == one["storage"]


def test_directory_as_checkpoint_is_one_line(cli, tmp_path):
    for name in ("folder", "folder.pt2"):
        (tmp_path / name).mkdir()
        code, out, err = cli("count", str(tmp_path / name))
        assert code == 2 and "a directory, not a checkpoint file" in " ".join(err.split())
        assert "Traceback" not in out + err


@pytest.mark.parametrize("content", [b"hello", None])
def test_pt2_that_is_no_export_is_one_line(tmp_path, content):
    """torch.export.load logs the deserialising traceback on stderr; the CLI shows only its own line."""
    import subprocess
    import sys

    path = tmp_path / "model.pt2"
    path.write_bytes(content if content is not None else CKPT.read_bytes())  # a zip archive, but no program
    result = subprocess.run([sys.executable, "-m", "micronet_score", "count", str(path)], capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert "not a torch.export program" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_data_file_for_a_language_model_is_one_line(cli):
    test_file = DATA / "wiki.test.tokens"
    code, out, err = cli("eval", str(CKPT), "--config", str(CONFIG), "--data", str(test_file))
    assert code == 2 and "a file; a language model's --data is the directory" in " ".join(err.split())
    assert "Traceback" not in out + err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("count", str(CKPT), "--bits", "0"), "Invalid value for '--bits'"),
        (("eval", "--act-bits", "33"), "Invalid value for '--act-bits'"),
        (("count",), "Missing argument"),
        (("eval", "--bogus"), "No such option: --bogus"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(cli, args, needle):
    code, out, err = cli(*args)
    assert code == 2
    assert needle in err and "--help" in err and len(err.strip().splitlines()) == 1, err


def test_error_text_is_not_read_as_markup(cli):
    code, _, err = cli("count", "[red]/nope.pt")
    assert code == 2 and "checkpoint not found: [red]/nope.pt" in err
