import pytest
from typer.testing import CliRunner


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
