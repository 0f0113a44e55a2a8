import pytest
from typer.testing import CliRunner


def pytest_configure(config):
    """One intra-op thread: the tests' models are small, and on a busy machine with few cores OpenMP's worker
    threads wait for each other (a first forward of a small PyramidNet took 5 s with 2 threads on 2 loaded cores,
    0.03 s with one)."""
    import torch

    torch.set_num_threads(1)


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
