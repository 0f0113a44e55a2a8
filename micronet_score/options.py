"""The options of a measurement: one object for the command line, :class:`~micronet_score.Counter` and
:func:`~micronet_score.count`, and the one place where a model's declared widths are resolved."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from micronet_score.errors import MicronetError
from micronet_score.ruleset import DEFAULT_RULES, RuleSet, load_rules

_BUNDLED: dict[str, RuleSet] = {}


def ruleset(rules: str | RuleSet) -> RuleSet:
    """A rule set; a bundled one is parsed once per process (rule sets are frozen), files are read every time."""
    if isinstance(rules, RuleSet):
        return rules
    if isinstance(rules, str) and rules in _BUNDLED:
        return _BUNDLED[rules]
    loaded = load_rules(rules)
    if isinstance(rules, str) and loaded.source == f"{rules} (bundled)":
        _BUNDLED[rules] = loaded
    return loaded


@dataclass(frozen=True)
class CountOptions:
    """How to price a model.

    - ``rules``: the rule set, a bundled name, a ``.toml`` path or a :class:`RuleSet`;
    - ``track``: the track whose baseline gives the score and whose unit (sample or token) the averages use;
    - ``bits`` / ``act_bits``: declared widths of the weights and activations (None: what the tensors hold);
    - ``weight_bits``: declared widths per tensor name, over ``bits``;
    - ``freebie``: an unquantized entry's 16-bit parameters and multiplications (additions stay 32-bit);
    - ``strict``: fail on any op without a price in the rule set instead of reporting it;
    - ``representation``: how tensors with zeros are stored, "auto" (the cheapest by its effect on the score; by
      storage without a track), "dense", "masked" (nonzeros + 1-bit mask) or "block" (one bit per block); the dot
      products follow (zeros are skipped only in a sparse representation).
    """

    rules: str | RuleSet = DEFAULT_RULES
    track: str | None = None
    bits: int | None = None
    act_bits: int | None = None
    weight_bits: Mapping[str, int] | None = None
    freebie: bool = False
    strict: bool = False
    representation: str = "auto"

    @classmethod
    def of(cls, options: CountOptions | None = None, **settings: Any) -> CountOptions:
        """``options`` (or the defaults) with ``settings`` over them; an unknown setting is an error."""
        if options is not None and not isinstance(options, CountOptions):
            raise MicronetError(f"options must be a CountOptions, got {type(options).__name__} (a rule set is given "
                                "as rules=...)")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise MicronetError(f"unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        return replace(options or cls(), **settings)

    def ruleset(self) -> RuleSet:
        return ruleset(self.rules)

    def track_name(self) -> str | None:
        """The track's name in the rule set (None when no track is named); an unknown track lists the known."""
        return self.ruleset().track_name(self.track) if self.track else None

    def declared_by(self, config: Mapping[str, Any] | None = None) -> CountOptions:
        """The options with the widths a model's file declares: a configuration with ``quantized`` and ``bits``
        (the MIT model's) declares ``bits`` when the user did not. Parameters its modules declare
        ``unquantized`` (:mod:`micronet_score.hints`) stay at their dtype's width whatever ``bits`` says."""
        config = config or {}
        if self.bits is not None or not (config.get("quantized") and config.get("bits")):
            return self
        return replace(self, bits=int(config["bits"]))

    @property
    def declares_widths(self) -> bool:
        """Whether widths were declared (which an audit of the model then checks)."""
        return self.bits is not None or self.act_bits is not None or bool(self.weight_bits)


OPTION_NAMES = tuple(f.name for f in fields(CountOptions))
