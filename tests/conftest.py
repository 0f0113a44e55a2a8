import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
RUNNER_FILES = ("__pycache__", ".pytest_cache")
"""What the interpreter and pytest themselves write into the tree (bytecode, pytest's own cache): not the suite."""


def _untracked() -> set[str] | None:
    """Untracked and ignored paths of the source tree (folders collapsed), or None outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--ignored=matching", "--untracked-files=normal"],
            capture_output=True, text=True, check=False, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    paths = {line[3:] for line in result.stdout.splitlines() if line[:2] in ("??", "!!")}
    return {p for p in paths if not any(part in RUNNER_FILES for part in Path(p).parts)}


def pytest_configure(config):
    """One intra-op thread: the tests' models are small, and on a busy machine with few cores OpenMP's worker
    threads wait for each other (a first forward of a small PyramidNet took 5 s with 2 threads on 2 loaded cores,
    0.03 s with one). Hypothesis keeps its storage (example database, caches) in a temporary directory, not in
    ``.hypothesis/`` of the working directory; and the tree's untracked files are noted, to check at the end
    that the suite wrote nothing into it."""
    import torch
    from hypothesis.configuration import set_hypothesis_home_dir

    torch.set_num_threads(1)
    home = Path(tempfile.mkdtemp(prefix="micronet-score-hypothesis-"))
    set_hypothesis_home_dir(home)
    config.stash[_HOME] = home
    config.stash[_BEFORE] = _untracked()


_HOME = pytest.StashKey[Path]()
_BEFORE = pytest.StashKey["set[str] | None"]()


def pytest_sessionfinish(session, exitstatus):
    """The suite writes only under temporary directories: a file it left in the source tree fails the run."""
    config = session.config
    shutil.rmtree(config.stash.get(_HOME, None) or "", ignore_errors=True)
    before = config.stash.get(_BEFORE, None)
    after = _untracked() if before is not None else None
    if before is None or after is None:
        return
    new = sorted(after - before)
    if new:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"the test suite wrote into the source tree: {', '.join(new)}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory):
    """Token caches go to a temporary directory (never the user's cache, never the source tree); subprocesses
    started by the tests inherit it."""
    import os

    from micronet_score.data.wikitext import CACHE_ENV

    folder = tmp_path_factory.mktemp("token-cache")
    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(folder)
    yield folder
    if old is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = old


@pytest.fixture
def cli():
    """Run the real micronet-score CLI in-process; returns (exit_code, stdout, stderr)."""
    from micronet_score.cli import app

    runner = CliRunner()

    def run(*args: str):
        result = runner.invoke(app, list(args))
        return result.exit_code, result.stdout, result.stderr

    return run


@pytest.fixture(scope="session")
def meta_count():
    """Count a bundled architecture (default configuration) on the meta device: ``meta_count(name, example)``."""
    import torch
    from micronet_score.models.registry import get

    import micronet_score as ms

    def run(name: str, example: "torch.Tensor", **options):
        spec = get(name)
        with torch.device("meta"):
            model = spec.build(spec.default_config).eval()
        return ms.count(model, example.to("meta"), track=spec.track, **options)

    return run
