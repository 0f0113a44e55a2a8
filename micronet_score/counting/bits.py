"""Bit-widths: what the user declared, the freebie, and widths that flow from fake quantization.

Rules (§1.3, §1.4): a b-bit value or op counts b / unit_bits; a multiply (or other op) runs at the largest
width of its inputs, an addition at the accumulator width. The freebie lets unquantized entries count
parameters and multiplies at 16 bits (additions stay 32) and is forbidden once anything is below 16 bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from micronet_score.errors import MicronetError
from micronet_score.ruleset import RuleSet

FLOAT_BITS: dict[torch.dtype, int] = {torch.float16: 16, torch.bfloat16: 16, torch.float64: 64}
FLOAT_BITS.update(
    {getattr(torch, name): 8 for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
     if hasattr(torch, name)}
)
"""Floating-point dtypes of another width than the default (fp32): a value of one has its dtype's width
(storage, and the width of the multiplies it enters), as an fp16 or bf16 model and autocast produce; an fp64
model counts 64 bits (two 32-bit units per value), never the default's 32."""


@dataclass
class BitPolicy:
    """The widths in force while counting one model."""

    rules: RuleSet
    bits: int | None = None
    act_bits: int | None = None
    weight_bits: Mapping[str, int] = field(default_factory=dict)
    freebie: bool = False
    unquantized: frozenset[str] = frozenset()
    """parameters the model declares unquantized (:mod:`micronet_score.hints`): ``bits`` does not cover them"""

    def __post_init__(self) -> None:
        declared = {"bits": self.bits, "act_bits": self.act_bits}
        declared.update({f"weight_bits[{name!r}]": b for name, b in self.weight_bits.items()})
        for what, width in declared.items():
            if width is not None and (not isinstance(width, int) or width < 1):
                raise MicronetError(f"{what} must be a positive whole number of bits (got {width!r})")
        if self.freebie:
            for what, width in declared.items():
                self.check_freebie(width, what)
        self.weight_bits = dict(self.weight_bits)
        self.activation = self.act_bits or self.rules.default_bits
        """width of an activation of the default float dtype"""
        self.unit = float(self.rules.unit_bits)
        self.add_bits = self.rules.freebie.add_bits if self.freebie else self.rules.accumulator_bits

    def check_freebie(self, width: int | None, what: str | Callable[[], str]) -> None:
        """The freebie is forbidden when any part of the model is quantized below freebie.max_quantized_bits.
        ``what`` names the value (a callable: made only for the message, as checks run on every operand)."""
        limit = self.rules.freebie.max_quantized_bits
        if self.freebie and width is not None and width < limit:
            raise MicronetError(
                f"the freebie is not allowed: {what() if callable(what) else what} is {width} bits, below {limit} "
                f"(rule set {self.rules.name}: quantized entries count their real widths)"
            )

    def declared(self, names: list[str], is_parameter: bool) -> int | None:
        """Width the user declared for a tensor known by these names: per tensor, else global (parameters)."""
        for name in names:
            if name in self.weight_bits:
                return self.weight_bits[name]
        if not is_parameter or any(name in self.unquantized for name in names):
            return None
        return self.bits

    def activation_of(self, dtype: torch.dtype) -> int:
        """Width of an activation nobody marked: the declared activation width, else its dtype's (fp16: 16,
        fp64: 64)."""
        if self.act_bits:
            return self.act_bits
        width = FLOAT_BITS.get(dtype)
        if width is None:
            return self.rules.default_bits
        if self.freebie:
            self.check_freebie(width, lambda: f"an activation of dtype {str(dtype).removeprefix('torch.')}")
        return width

    @property
    def scale_bits(self) -> int:
        """Width of a quantized layer's scales (the rule set's quantization policy)."""
        return self.rules.quantization.scale_bits

    def zero_point_bits(self, value_bits: int) -> int:
        """Width of the zero points of values quantized to ``value_bits`` (the rule set's quantization policy)."""
        width = self.rules.quantization.zero_point_bits
        return value_bits if width == "values" else width

    def stored(self, names: list[str], is_parameter: bool, native: int | None = None) -> int:
        """Storage width of a tensor known by these names: freebie, per-tensor, its narrow dtype's width
        (``native``: integer, quantized, fp16/bf16), global (parameters), default."""
        if self.freebie:
            if native is not None and native > 1:  # a narrow dtype's values (fp8, int8) are quantized entries;
                what = f"tensor {names[0]!r}" if names else "a tensor"  # 1-bit values (bool) are masks and flags
                self.check_freebie(native, f"{what} (by its dtype)")
            return self.rules.freebie.param_bits
        for name in names:
            if name in self.weight_bits:
                return self.weight_bits[name]
        if native is not None:
            return native
        return self.declared(names, is_parameter) or self.rules.default_bits


def quantized_bits(quant_min: int, quant_max: int) -> int:
    """Width implied by a fake quantizer's integer range: ceil(log2(quant_max - quant_min + 1))."""
    return max(1, math.ceil(math.log2(int(quant_max) - int(quant_min) + 1)))


class Marks:
    """Widths of activations set by fake quantizers and output_bits modules, per tensor (weakly held)."""

    def __init__(self) -> None:
        self._widths: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        self.used = False
        self.lowest: int | None = None

    def set(self, tensor: object, width: int) -> None:
        self._widths[tensor] = width
        self.used = True
        self.lowest = width if self.lowest is None else min(self.lowest, width)

    def get(self, tensor: object) -> int | None:
        return self._widths.get(tensor)

    def clear(self) -> None:
        self._widths = WeakTensorKeyDictionary()
        self.used = False
