"""micronet-score: what a compressed model really costs, by the NeurIPS 2019 MicroNet Challenge rules."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("micronet-score")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

from micronet_score.counting import Counter, count, count_shapes
from micronet_score.errors import MicronetError, RuleError
from micronet_score.options import CountOptions
from micronet_score.report import Report
from micronet_score.ruleset import RuleSet, load_rules

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
