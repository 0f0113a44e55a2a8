"""micronet-score: what a compressed model really costs, by the NeurIPS 2019 MicroNet Challenge rules."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("micronet-score")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

from micronet_score.errors import MicronetError, RuleError  # noqa: E402
from micronet_score.ruleset import RuleSet, load_rules  # noqa: E402
from micronet_score.report import Report  # noqa: E402
from micronet_score.counting import Counter, count  # noqa: E402

__all__ = ["Counter", "MicronetError", "Report", "RuleError", "RuleSet", "count", "load_rules", "__version__"]
