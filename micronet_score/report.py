"""The report of a count: storage, operations, score, per-layer rows, per-family totals and uncounted ops.

One vocabulary in every output (tables, JSON, CSV, Markdown, HTML):

- ``parameters``: the raw count of stored values (elements, tied tensors once);
- ``storage``: storage in 32-bit equivalents (a b-bit value counts b / 32; sparsity masks included);
- ``operations``: operations in 32-bit equivalents (a b-bit op counts b / 32), averaged per sample (image tracks)
  or per token (language tracks);
- ``mults``, ``adds`` and ``others``: the raw operation counts per sample/token before width scaling.

Schema ``micronet-score/1`` called storage ``params`` in the report (and the raw count ``params`` in the layer
rows) and operations ``flops``. Those keys still parse, are still written beside the new ones for one release
(schema ``micronet-score/2``), and stay readable as Python attributes (``report.params``, ``report.flops``,
``row.params``, ``row.flops``).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, computed_field, model_validator

SCHEMA = "micronet-score/2"

_ALIAS_NOTE = "deprecated alias (schema micronet-score/1) of "


def _by(name: str, old: str) -> AliasChoices:
    """Read a field by its name, or by its schema-1 key."""
    return AliasChoices(name, old)


class LayerRow(BaseModel):
    """One module (a leaf, or a module with its own ops or tensors; "" is the root)."""

    name: str
    type: str
    parameters: int = Field(validation_alias=_by("parameters", "params"),
                            description="raw parameter count: stored values (elements), tied tensors once")
    nonzeros: int
    density: float | None
    bits: int | None = Field(description="widest storage width of the module's tensors")
    storage: float = Field(description="storage in 32-bit equivalents, masks included")
    representation: str | None = Field(
        default=None, description="how its tensors are stored: dense, masked, block RxC ('+'-joined when they differ)"
    )
    mults: float
    adds: float
    others: float
    operations: float = Field(validation_alias=_by("operations", "flops"),
                              description="operations in 32-bit equivalents per sample/token")
    share: float = Field(description="the module's share of the total operations")

    @computed_field(description=_ALIAS_NOTE + "parameters (the raw count)")  # type: ignore[prop-decorator]
    @property
    def params(self) -> int:
        return self.parameters

    @computed_field(description=_ALIAS_NOTE + "operations")  # type: ignore[prop-decorator]
    @property
    def flops(self) -> float:
        return self.operations


class TensorRow(BaseModel):
    """One stored tensor (tied tensors once, under their first name) and the representation chosen for it."""

    name: str
    module: str
    numel: int
    nonzeros: int
    bits: int
    representation: str = Field(description="dense, masked (nonzeros + 1-bit mask) or block RxC (one bit per block)")
    storage: float = Field(description="storage in 32-bit equivalents, mask included")


class OpTotal(BaseModel):
    """Totals of one op family (calls over everything measured; counts per sample/token)."""

    family: str
    calls: int
    mults: float
    adds: float
    others: float
    operations: float = Field(validation_alias=_by("operations", "flops"),
                              description="operations in 32-bit equivalents per sample/token")

    @computed_field(description=_ALIAS_NOTE + "operations")  # type: ignore[prop-decorator]
    @property
    def flops(self) -> float:
        return self.operations


class UncountedOp(BaseModel):
    """An op the rule set does not price: never counted as zero silently."""

    op: str
    module: str
    calls: int
    elements: int


Verdict = Literal["qualifies", "does not qualify", "partial run: not a verdict"]


class Quality(BaseModel):
    # a perplexity can be infinite or NaN (a target with probability zero, NaN weights): JSON gets the constants
    # Infinity / NaN that Python's json module reads and writes, not a null that would hide it
    model_config = ConfigDict(ser_json_inf_nan="constants")

    metric: str
    value: float
    threshold: float
    qualifies: bool = Field(description="true only for a complete run that meets the threshold")
    complete: bool = Field(True, description="false when only part of the test set was evaluated")

    @computed_field(description="qualifies, does not qualify, or partial run: not a verdict")  # type: ignore[prop-decorator]
    @property
    def verdict(self) -> Verdict:
        if not self.complete:
            return "partial run: not a verdict"
        return "qualifies" if self.qualifies else "does not qualify"


with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "schema"')

    class Report(BaseModel):
        """Everything a count found, ready to render as a table, JSON, CSV, Markdown or an HTML page."""

        model_config = ConfigDict(protected_namespaces=())

        schema: str = SCHEMA  # type: ignore[assignment]
        rules: str
        track: str | None = None
        samples: float
        per: Literal["sample", "token"]
        parameters: int = Field(description="raw parameter count: stored values, tied tensors once")
        storage: float = Field(validation_alias=_by("storage", "params"),
                               description="storage in 32-bit equivalents")
        operations: float = Field(validation_alias=_by("operations", "flops"),
                                  description="operations in 32-bit equivalents per sample/token")
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

        @model_validator(mode="before")
        @classmethod
        def _raw_parameters(cls, data: Any) -> Any:
            """Schema-1 reports (and counters that do not give it) have no raw count: the sum of the layers'."""
            if isinstance(data, dict) and "parameters" not in data:
                rows = data.get("layers") or []
                count = 0
                for row in rows:
                    if isinstance(row, LayerRow):
                        count += row.parameters
                    elif isinstance(row, dict):
                        count += int(row.get("parameters", row.get("params", 0)))
                data = {**data, "parameters": count}
            return data

        @computed_field(description=_ALIAS_NOTE + "storage (32-bit equivalents)")  # type: ignore[prop-decorator]
        @property
        def params(self) -> float:
            return self.storage

        @computed_field(description=_ALIAS_NOTE + "operations")  # type: ignore[prop-decorator]
        @property
        def flops(self) -> float:
            return self.operations

        def family(self, name: str) -> OpTotal:
            """The totals of one op family (zeros when the model has none)."""
            for total in self.ops:
                if total.family == name:
                    return total
            return OpTotal(family=name, calls=0, mults=0, adds=0, others=0, operations=0)

        def layer(self, name: str) -> LayerRow:
            """The row of the module at this path."""
            for row in self.layers:
                if row.name == name:
                    return row
            raise KeyError(name)

        def to_html(self, title: str = "micronet-score report", audit=None, rules=None) -> str:
            """A self-contained HTML page (charts inline, no network at view time); see ``html_report``."""
            from micronet_score.html_report import render_html

            return render_html(self, title=title, audit=audit, rules=rules)
