import pytest
from typer.testing import CliRunner


def pytest_configure(config):
    """One intra-op thread: the tests' models are small, and on a busy machine with few cores OpenMP's worker
    threads wait for each other (a first forward of a small PyramidNet took 5 s with 2 threads on 2 loaded cores,
    0.03 s with one)."""
    import torch

    torch.set_num_threads(1)


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
