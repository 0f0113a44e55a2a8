"""The report of a count: storage, operations, score, per-layer rows, per-family totals and uncounted ops.

Storage (``params``) and operations (``flops``) are in 32-bit equivalents (a b-bit value or op counts
b / 32); operations are averaged per sample (image tracks) or per token (language tracks). ``mults``,
``adds`` and ``others`` are the raw counts per sample/token before width scaling.
"""

from __future__ import annotations

import warnings
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA = "micronet-score/1"


class LayerRow(BaseModel):
    """One module (a leaf, or a module with its own ops or tensors; "" is the root)."""

    name: str
    type: str
    params: int = Field(description="stored values (elements), tied tensors once")
    nonzeros: int
    density: float | None
    bits: int | None = Field(description="widest storage width of the module's tensors")
    storage: float = Field(description="32-bit-equivalent storage, masks included")
    representation: str | None = Field(
        default=None, description="how its tensors are stored: dense, masked, block RxC ('+'-joined when they differ)"
    )
    mults: float
    adds: float
    others: float
    flops: float = Field(description="32-bit-equivalent operations per sample/token")
    share: float = Field(description="the module's share of the total flops")


class TensorRow(BaseModel):
    """One stored tensor (tied tensors once, under their first name) and the representation chosen for it."""

    name: str
    module: str
    numel: int
    nonzeros: int
    bits: int
    representation: str = Field(description="dense, masked (nonzeros + 1-bit mask) or block RxC (one bit per block)")
    storage: float = Field(description="32-bit-equivalent storage, mask included")


class OpTotal(BaseModel):
    """Totals of one op family (calls over everything measured; counts per sample/token)."""

    family: str
    calls: int
    mults: float
    adds: float
    others: float
    flops: float


class UncountedOp(BaseModel):
    """An op the rule set does not price: never counted as zero silently."""

    op: str
    module: str
    calls: int
    elements: int


class Quality(BaseModel):
    # a perplexity can be infinite or NaN (a target with probability zero, NaN weights): JSON gets the constants
    # Infinity / NaN that Python's json module reads and writes, not a null that would hide it
    model_config = ConfigDict(ser_json_inf_nan="constants")

    metric: str
    value: float
    threshold: float
    qualifies: bool


with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "schema"')

    class Report(BaseModel):
        """Everything a count found, ready to render as a table or JSON."""

        model_config = ConfigDict(protected_namespaces=())

        schema: str = SCHEMA  # type: ignore[assignment]
        rules: str
        track: str | None = None
        samples: float
        per: Literal["sample", "token"]
        params: float = Field(description="32-bit-equivalent storage")
        flops: float = Field(description="32-bit-equivalent operations per sample/token")
        mults: float
        adds: float
        others: float
        score: float | None = None
        layers: list[LayerRow] = Field(default_factory=list)
        tensors: list[TensorRow] = Field(default_factory=list)
        unused: list[str] = Field(
            default_factory=list, description="parameters of modules that never ran, read by no op: not stored"
        )
        ops: list[OpTotal] = Field(default_factory=list)
        uncounted: list[UncountedOp] = Field(default_factory=list)
        conversions: int = 0
        quality: Quality | None = None
        warnings: list[str] = Field(default_factory=list)

        def family(self, name: str) -> OpTotal:
            """The totals of one op family (zeros when the model has none)."""
            for total in self.ops:
                if total.family == name:
                    return total
            return OpTotal(family=name, calls=0, mults=0, adds=0, others=0, flops=0)

        def layer(self, name: str) -> LayerRow:
            """The row of the module at this path."""
            for row in self.layers:
                if row.name == name:
                    return row
            raise KeyError(name)
