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
