"""micronet-score: what a compressed model really costs, by the NeurIPS 2019 MicroNet Challenge rules."""

from micronet_score import interrupts as _interrupts

if _interrupts.started_as_command():  # first of all: Ctrl-C is one line and exit 130 from here on
    _interrupts.install()

from importlib.metadata import PackageNotFoundError, version  # after: it takes 0.1-0.2 s to import

try:
    __version__ = version("micronet-score")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

_API = {
    "Counter": "micronet_score.counting",
    "count": "micronet_score.counting",
    "count_shapes": "micronet_score.counting",
    "MicronetError": "micronet_score.errors",
    "RuleError": "micronet_score.errors",
    "Report": "micronet_score.report",
    "RuleSet": "micronet_score.ruleset",
    "load_rules": "micronet_score.ruleset",
    "CountOptions": "micronet_score.options",
}


def __getattr__(name: str):
    """The public API, imported on first use (so that the command line can take over Ctrl-C before torch loads)."""
    if name not in _API:
        raise AttributeError(f"module 'micronet_score' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "CountOptions",
    "Counter",
    "MicronetError",
    "Report",
    "RuleError",
    "RuleSet",
    "__version__",
    "count",
    "count_shapes",
    "load_rules",
]
