"""The CLI entry points: --help, rules (rich and JSON), clear errors with exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

BUNDLED = Path(__file__).resolve().parents[1] / "rules" / "micronet-2019.toml"


def test_help(cli):
    code, out, _ = cli("--help")
    assert code == 0
    assert "rules" in out


def test_rules_view(cli):
    code, out, _ = cli("rules")
    assert code == 0
    assert "micronet-2019" in out
    assert "WikiText-103" in out and "CIFAR-100" in out and "ImageNet" in out
    assert "dot_product" in out


def test_rules_json(cli):
    code, out, _ = cli("rules", "micronet-2019", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["name"] == "micronet-2019"
    assert data["tracks"]["imagenet"]["threshold"] == 37500
    assert data["tracks"]["wikitext103"]["comparison"] == "le"


def test_rules_list(cli):
    code, out, _ = cli("rules", "--list")
    assert code == 0 and "micronet-2019" in out.split()


def test_broken_rule_file_exits_2_with_one_clear_line(cli, tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text(BUNDLED.read_text().replace("baseline_flops = 318e6", "baseline_flops = -1"))
    code, out, err = cli("rules", str(path))
    assert code == 2
    assert "Traceback" not in out + err
    message = " ".join(err.split())
    assert str(path) in message and "tracks.wikitext103.baseline_flops" in message


def test_unknown_rule_name_exits_2(cli):
    code, _, err = cli("rules", "micronet-1999")
    assert code == 2
    assert "micronet-1999" in err


def test_python_dash_m_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "micronet_score", "rules", "--json"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["unit_bits"] == 32


def test_rule_file_with_a_byte_order_mark_loads(cli, tmp_path):
    """Editors on Windows save UTF-8 with a BOM; tomllib refuses it, the rule loader reads past it."""
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + BUNDLED.read_bytes())
    code, out, err = cli("rules", str(path), "--json")
    assert code == 0, err
    assert json.loads(out)["tracks"]["wikitext103"]["baseline_flops"] == 318e6
