"""The wheel installs micronet_score with its models and rules inside the package namespace only."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    # built from a copy of the sources: setuptools writes build/ and *.egg-info beside the project it builds
    source = tmp_path_factory.mktemp("source") / "micronet-score"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*cache", ".hypothesis", ".micronet-cache"))
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = out.glob("micronet_score-*.whl")
    return zipfile.ZipFile(wheel).namelist()


def test_no_top_level_models_or_rules(wheel_names):
    top_level = {name.split("/")[0] for name in wheel_names}
    assert "models" not in top_level and "rules" not in top_level
    assert "micronet_score" in top_level


def test_rules_and_models_inside_the_package(wheel_names):
    assert "micronet_score/rules/micronet-2019.toml" in wheel_names
    assert "micronet_score/models/__init__.py" in wheel_names
    assert any(name.endswith("entry_points.txt") for name in wheel_names)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if line.startswith("python3 -m venv"))
    assert command in readme


def test_every_source_module_is_in_the_wheel(wheel_names):
    """A wheel that misses a subpackage installs a tool that cannot import itself."""
    expected = {f"micronet_score/{p.relative_to(ROOT / 'micronet_score').as_posix()}"
                for p in (ROOT / "micronet_score").rglob("*.py")}
    expected |= {f"micronet_score/models/{p.relative_to(ROOT / 'models').as_posix()}"
                 for p in (ROOT / "models").rglob("*.py")}
    assert expected <= set(wheel_names)
    demo = {f"micronet_score/models/{p.relative_to(ROOT / 'models').as_posix()}"
            for p in (ROOT / "models" / "demo").rglob("*") if p.is_file() and ".micronet-cache" not in p.parts}
    assert demo <= set(wheel_names)
