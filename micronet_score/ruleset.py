"""Rule sets as data: pydantic models of the TOML files in ``rules/`` and their loader.

A rule set holds everything that turns raw counts into a MicroNet score: the tracks with their baselines and
quality thresholds, the unit and accumulator widths, the freebie, the sparsity-mask and folding policies, and
the price of every op family. Nothing in the counting code hard-codes these numbers.
"""

from __future__ import annotations

import math
import re
import reprlib
import tomllib
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    ValidationError,
    model_validator,
)

from micronet_score.errors import MicronetError, RuleError

DEFAULT_RULES = "micronet-2019"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Count = Annotated[float, Field(allow_inf_nan=False, ge=-1e12, le=1e12)]
"""A price: finite (a NaN or infinite price would make every total NaN or infinite)."""
Bits = Annotated[int, Field(ge=1, le=64)]
"""A width in bits: 1 to 64."""
Baseline = Annotated[float, Field(ge=1, le=1e18, allow_inf_nan=False)]
"""A baseline's storage or operations: at least 1 (a smaller one overflows the score to infinity) and finite."""
MAX_RULE_FILE = 4 << 20
MAX_NESTING = 16
MAX_INPUT_ELEMENTS = 1 << 28
_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"[^"\n]{0,200}"|'[^'\n]{0,200}')"""
_LONG_DOTTED_KEY = re.compile(rf"{_KEY_PART}(?:[ \t]*\.[ \t]*{_KEY_PART}){{{MAX_NESTING},}}")
"""A dotted key of more than MAX_NESTING parts, found before parsing: tomllib takes memory quadratic in the parts
(a 100,000-part key exhausts any machine)."""


class Cost(_Strict):
    """Raw operation counts: multiplies, additions, and others (transcendentals, comparisons, bitwise)."""

    mults: Count = 0.0
    adds: Count = 0.0
    others: Count = 0.0


class OpRule(_Strict):
    """The price of one op family: ``elements * per_element + groups * per_group``.

    What the elements and groups of an op are is fixed by its family (for a dot product: the terms and the
    outputs; for a reduction: the inputs and the outputs; for an elementwise op: the output elements).
    The formula itself is applied in one place, :class:`micronet_score.counting.costs.Price`.

    A composite family (a recurrent cell) is ``made_of`` other families instead: n of its elements cost
    n * count of each listed family, and its pieces are reported under their own families.
    """

    per_element: Cost = Cost()
    per_group: Cost = Cost()
    made_of: dict[str, Annotated[float, Field(ge=0, le=1e12, allow_inf_nan=False)]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _never_negative(self) -> OpRule:
        """No count may come out negative: per_element >= 0, and a group (which holds at least one element) costs
        per_element + per_group >= 0 (a dot product of n terms: n mults, n - 1 adds)."""
        for field in ("mults", "adds", "others"):
            element, group = getattr(self.per_element, field), getattr(self.per_group, field)
            if element < 0:
                raise ValueError(f"per_element.{field} must not be negative")
            if element + group < 0:
                raise ValueError(f"per_group.{field} = {group:g} would make a group of one element cost "
                                 f"{element + group:g} {field} (per_element + per_group must not be negative)")
        return self


class Comparison(str, Enum):
    ge = "ge"
    le = "le"
    gt = "gt"
    lt = "lt"

    @property
    def symbol(self) -> str:
        return {"ge": ">=", "le": "<=", "gt": ">", "lt": "<"}[self.value]

    def holds(self, value: float, threshold: float) -> bool:
        return {
            "ge": value >= threshold,
            "le": value <= threshold,
            "gt": value > threshold,
            "lt": value < threshold,
        }[self.value]


class Track(_Strict):
    """A task of the challenge: its baseline (the score's denominators) and its quality threshold."""

    title: str
    baseline_model: str
    baseline_params: Baseline
    baseline_flops: Baseline
    metric: Literal["top1_correct", "top1_accuracy", "perplexity"]
    metric_title: str = ""
    threshold: float = Field(ge=0, allow_inf_nan=False)
    comparison: Comparison
    per: Literal["sample", "token"]
    test_size: Annotated[int, Field(ge=1, le=10**9)] | None = None
    vocabulary: Annotated[int, Field(ge=1, le=10**9)] | None = None
    input_shape: Annotated[list[Annotated[int, Field(ge=1, le=1 << 20)]], Field(max_length=8)] | None = None

    @model_validator(mode="after")
    def _input_fits_in_memory(self) -> Track:
        if self.input_shape and math.prod(self.input_shape) > MAX_INPUT_ELEMENTS:
            raise ValueError(f"input_shape {self.input_shape} has more than {MAX_INPUT_ELEMENTS:,} elements")
        return self

    def qualifies(self, value: float) -> bool:
        """Whether a quality value meets the threshold exactly as the rules compare it (no rounding)."""
        return not math.isnan(value) and self.comparison.holds(value, self.threshold)


class Freebie(_Strict):
    """Unquantized entries may count parameters and multiplies at 16 bits; additions stay at 32."""

    param_bits: Bits
    mult_bits: Bits
    add_bits: Bits
    other_bits: Bits
    max_quantized_bits: Bits = Field(description="the freebie is forbidden when any value is quantized below "
                                                 "this width")


class MaskPolicy(_Strict):
    bits_per_element: float = Field(ge=0, le=64, allow_inf_nan=False)
    bits_per_block: float = Field(ge=0, le=64, allow_inf_nan=False)
    block_sparsity: bool
    only_sparse_tensors: bool


class FoldingPolicy(_Strict):
    batch_norm_after_linear: Literal["bias", "scale_shift"]
    batch_norm_elsewhere: Literal["scale_shift"]
    layer_norm_affine: Literal["keep", "fold"]


class StoragePolicy(_Strict):
    """Values stored beside the weights: a batch norm's per channel, by how it folds."""

    batch_norm_values: dict[Literal["bias", "scale_shift"], NonNegativeInt] = Field(
        default={"bias": 1, "scale_shift": 2}, description="values stored per channel, by the folding of [folding]"
    )


class AttentionPolicy(_Strict):
    """How scaled dot-product attention is priced, whichever kernel runs it (fused or the math path)."""

    scale: Literal["per_score", "per_query"] = Field(
        description="the 1/sqrt(d) scale: one multiply per score, or per query element (q scaled first)"
    )
    mask: Literal["add_per_score", "free"] = Field(
        description="an attention mask, explicit or causal: one add per score, or free"
    )


class QuantizationPolicy(_Strict):
    """Widths of what a quantized layer stores besides its values: scales and zero points."""

    scale_bits: Bits
    zero_point_bits: Bits | Literal["values"] = Field(
        description='a width, or "values": the width of the quantized values they offset'
    )


class RuleSet(_Strict):
    """A complete rule set. ``ops`` may omit families: ops of a missing family are reported as uncounted."""

    name: str
    title: str
    description: str = ""
    unit_bits: Bits
    accumulator_bits: Bits
    default_bits: Bits
    freebie: Freebie
    mask: MaskPolicy
    folding: FoldingPolicy
    storage: StoragePolicy = StoragePolicy()
    attention: AttentionPolicy
    quantization: QuantizationPolicy
    tracks: dict[str, Track]
    ops: dict[str, OpRule]
    source: str = Field(default="", exclude=True)

    @model_validator(mode="after")
    def _composites_made_of_priced_families(self) -> RuleSet:
        for name, rule in self.ops.items():
            for part in rule.made_of:
                if part not in self.ops or self.ops[part].made_of:
                    raise ValueError(f"ops.{name}.made_of names {part!r}, which is not a priced family")
        return self

    def track(self, name: str) -> Track:
        """The track called ``name`` (case, '-' and '_' ignored: 'CIFAR-100' finds 'cifar100')."""
        key = track_key(name)
        for track_name, track in self.tracks.items():
            if track_key(track_name) == key or track_key(track.title) == key:
                return track
        known = ", ".join(self.tracks)
        raise MicronetError(f"unknown track {name!r}: rule set {self.name} has the tracks {known}")

    def track_name(self, name: str) -> str:
        track = self.track(name)
        return next(k for k, v in self.tracks.items() if v is track)

    def score(self, params: float, flops: float, track: str) -> float:
        """Score = storage / baseline storage + operations / baseline operations (both 32-bit equivalents)."""
        t = self.track(track)
        return params / t.baseline_params + flops / t.baseline_flops


def track_key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def bundled_rule_names() -> list[str]:
    """Names of the rule sets shipped with micronet-score."""
    folder = resources.files("micronet_score.rules")
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def _read_source(name_or_path: str | Path) -> tuple[str, str]:
    text_name = str(name_or_path)
    path = Path(text_name)
    if path.suffix == ".toml" or path.exists() or "/" in text_name:
        if not path.is_file():
            raise RuleError(text_name, None, "no such file" if not path.exists() else "not a regular file")
        try:
            if path.stat().st_size > MAX_RULE_FILE:
                raise RuleError(text_name, None, f"{path.stat().st_size:,} bytes (a rule file has at most "
                                                 f"{MAX_RULE_FILE:,})")
            return text_name, path.read_text(encoding="utf-8-sig")  # a BOM, as some editors write, is not TOML
        except UnicodeDecodeError as exc:
            raise RuleError(text_name, None, f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                                             f"{exc.start})") from None
        except OSError as exc:
            raise RuleError(text_name, None, f"cannot read it ({exc.strerror or exc})") from None
    if text_name not in bundled_rule_names():
        known = ", ".join(bundled_rule_names())
        raise RuleError(text_name, None, f"no bundled rule set of that name (bundled: {known}; or give a .toml file)")
    resource = resources.files("micronet_score.rules") / f"{text_name}.toml"
    return f"{text_name} (bundled)", resource.read_text(encoding="utf-8-sig")


def _short_repr() -> reprlib.Repr:
    shown = reprlib.Repr()
    shown.maxlevel, shown.maxstring, shown.maxother, shown.maxlong, shown.maxdict, shown.maxlist = 2, 60, 60, 40, 4, 4
    return shown


_SHOWN = _short_repr()
"""Values quoted in error messages stay short, whatever the file holds."""


def _key(parts) -> str:
    shown = ".".join(str(p)[:60] for p in list(parts)[:MAX_NESTING])
    return shown + ("..." if len(parts) > MAX_NESTING else "")


def _nesting(data: dict) -> tuple[int, str | None]:
    """How deep the tables of a parsed TOML document nest, and the first key path at the deepest point."""
    deepest, where = 0, None
    stack: list[tuple[object, int, tuple[str, ...]]] = [(data, 0, ())]
    while stack:
        value, depth, path = stack.pop()
        if depth > deepest:
            deepest, where = depth, _key(path)
        if depth > MAX_NESTING:
            break
        if isinstance(value, dict):
            stack.extend((v, depth + 1, (*path, str(k))) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, depth + 1, (*path, str(i))) for i, v in enumerate(value))
    return deepest, where


def load_rules(name_or_path: str | Path | RuleSet = DEFAULT_RULES) -> RuleSet:
    """Load a bundled rule set by name, or a rule file by path; errors name the file, the key and the problem."""
    if isinstance(name_or_path, RuleSet):
        return name_or_path
    source, text = _read_source(name_or_path)
    if _LONG_DOTTED_KEY.search(text):
        raise RuleError(source, None, f"a dotted key of more than {MAX_NESTING} parts (a rule set nests at most "
                                      f"{MAX_NESTING} levels)")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RuleError(source, None, f"not valid TOML ({exc})") from None
    except RecursionError:
        raise RuleError(source, None, "not valid TOML (nested too deeply)") from None
    except ValueError as exc:  # an integer of thousands of digits
        raise RuleError(source, None, f"not valid TOML ({str(exc)[:200]})") from None
    depth, where = _nesting(data)
    if depth > MAX_NESTING:
        raise RuleError(source, where, f"keys nested {depth} levels deep (a rule set has at most {MAX_NESTING})")
    try:
        return RuleSet.model_validate({**data, "source": source})
    except ValidationError as exc:
        error = exc.errors()[0]
        key = _key(error["loc"]) or None
        problem = error["msg"]
        if error["type"] == "missing":
            problem = "required key is missing"
        elif "input" in error and error["type"] != "missing":
            problem = f"{problem} (got {_SHOWN.repr(error['input'])})"
        more = len(exc.errors()) - 1
        if more:
            problem += f" (and {more} more problem{'s' if more > 1 else ''})"
        raise RuleError(source, key, problem) from None
