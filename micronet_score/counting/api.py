"""The Python API: ``count`` for one forward, ``Counter`` for measuring inside a training or evaluation loop."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from micronet_score.counting.bits import BitPolicy
from micronet_score.counting.costs import Prices
from micronet_score.counting.interpreter import CountingMode, Tally
from micronet_score.counting.shapes import META_FALLBACKS, META_FAST, MetaCopy, data_dependent, to_meta
from micronet_score.counting.storage import FoldedNorm, Walk, WeightTable, account
from micronet_score.errors import MicronetError
from micronet_score.report import LayerRow, OpTotal, Report, UncountedOp
from micronet_score.ruleset import RuleSet, load_rules


class Counter:
    """Counts every forward run inside :meth:`measure`; :meth:`report` averages over all samples measured."""

    def __init__(
        self,
        model: nn.Module,
        rules: str | RuleSet = "micronet-2019",
        track: str | None = None,
        bits: int | None = None,
        act_bits: int | None = None,
        weight_bits: Mapping[str, int] | None = None,
        freebie: bool = False,
        strict: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise MicronetError(f"can only count a torch.nn.Module (got {type(model).__name__})")
        self.model = model
        self.rules = _load_rules(rules)
        self.track = self.rules.track_name(track) if track else None
        self.per = self.rules.tracks[self.track].per if self.track else "sample"
        self.policy = BitPolicy(self.rules, bits, act_bits, dict(weight_bits or {}), freebie)
        self.strict = strict
        self.prices = Prices(self.rules)
        walk = Walk.of(model)
        self._modules = walk.modules
        self._names = {id(m): path for path, m in self._modules.items()}
        self._output_bits = {
            id(m): m.output_bits
            for m in self._modules.values()
            if isinstance(getattr(m, "output_bits", None), int) and not isinstance(m.output_bits, bool)
        }
        self._check_names(walk)
        self._table: WeightTable | None = None
        self._walk = walk
        self._pending_walk: Walk | None = None
        self._meta_copy: tuple[WeightTable, MetaCopy] | None = None
        """count_shapes: the meta copy, made once per weight table"""
        """A walk known to be current, used once (count() runs the model right after walking it)."""
        self.reset()

    def _weights(self) -> WeightTable:
        """The weight table, rebuilt when the model's tensors changed, else refreshed where values changed."""
        walk, self._pending_walk = self._pending_walk or Walk.of(self.model), None
        keys = walk.identity()
        if self._table is None or not _same(keys, self._table_keys):
            self._table = WeightTable.of(self.model, self.policy, walk)
            self._table_keys = keys
        else:
            self._table.refresh(self.model, walk)
        return self._table

    def measured_elsewhere(self, nonzeros: Mapping[str, int]) -> None:
        """Nonzeros by tensor name, measured outside the model: for a model on the meta device whose values live
        in files (streamed from them), they stand for the values its meta tensors lack. Named tensors then count
        as known, in storage and in the densities of their operations; the others stay as they are."""
        table = self._weights()
        for info in table.by_key.values():
            name = next((n for n in info.names if n in nonzeros), None)
            if name is not None:
                info.nonzeros, info.known = nonzeros[name], True
                info.density = info.nonzeros / info.numel if info.numel else 1.0
        table.meta = any(not info.known for info in table.by_key.values())

    def _check_names(self, walk: Walk) -> None:
        known = {n for n, _ in walk.parameters}
        known |= {n for n, _ in walk.buffers}
        known |= {n[: -len("_orig")] for n in known if n.endswith("_orig")}
        unknown = sorted(set(self.policy.weight_bits) - known)
        if unknown:
            raise MicronetError(f"weight_bits names no tensor of the model: {', '.join(unknown)}")

    def reset(self) -> None:
        """Forget everything measured so far."""
        self.samples = 0.0
        self._tally = Tally()
        self._norms: dict[str, FoldedNorm] = {}
        self._dropped: set[int] = set()
        self._read: set[int] = set()
        self._meta = False

    @contextmanager
    def measure(self, samples: float | None = None, sample_dim: int = 0) -> Iterator[Counter]:
        """Count every forward of the model run inside; ``samples`` = samples/tokens they cover (inferred from
        dim ``sample_dim`` of the model's first input when not given)."""
        table = self._weights()
        mode = CountingMode(self.prices, self.policy, table, self._names, self._output_bits)
        with _installed(mode):
            yield self
        self._collect(mode, table, samples, sample_dim, None)

    def count_shapes(
        self, *inputs: Any, samples: float | None = None, sample_dim: int = 0, **forward_kwargs: Any
    ) -> Counter:
        """Count ``model(*inputs, **forward_kwargs)`` from shapes alone: the forward runs on a meta copy of the
        model (nothing is computed, the model itself is only read) and is priced with the real model's widths,
        densities and storage, so the totals equal a real forward's. The forward's control flow must not depend
        on tensor values (else MicronetError: count without shape_only). Returns the counter (call report()).

        The meta copy is made on the first call and kept while the model's tensors stay the same (it follows
        train()/eval()); the nonzeros are recounted, as for measure(), only for tensors changed since."""
        table = self._weights()
        if self._meta_copy is None or self._meta_copy[0] is not table:  # the table is rebuilt when tensors change
            self._meta_copy = (table, MetaCopy.of(self.model, Walk.of(self.model)))
        meta = self._meta_copy[1]
        meta.follow(self._modules)
        names = {id(m): path for path, m in meta.walk.modules.items() if path in self._modules}
        output_bits = {
            id(m): m.output_bits
            for path, m in meta.walk.modules.items()
            if id(self._modules.get(path)) in self._output_bits
        }
        mode = CountingMode(self.prices, self.policy, meta.table(table), names, output_bits)
        mode.meta_fallbacks, mode.meta_fast = META_FALLBACKS, META_FAST
        meta_inputs, meta_kwargs = to_meta(inputs), to_meta(forward_kwargs)
        try:
            with _installed(mode):
                meta.model(*meta_inputs, **meta_kwargs)
        except MicronetError:
            raise
        except (RuntimeError, NotImplementedError, TypeError, ValueError, IndexError) as err:
            raise data_dependent(err) from err
        self._collect(mode, table, samples, sample_dim, meta)
        return self

    def _collect(
        self, mode: CountingMode, table: WeightTable, samples: float | None, sample_dim: int, meta: MetaCopy | None
    ) -> None:
        first_input = mode.first_input_seen
        if samples is None:
            if not isinstance(first_input, torch.Tensor) or first_input.dim() <= sample_dim:
                raise MicronetError("cannot infer the number of samples: pass samples=N to measure()")
            samples = first_input.shape[sample_dim]
        if self.strict and mode.tally.uncounted:
            raise MicronetError(
                f"strict mode: ops without a price in rule set {self.rules.name}: {_describe(mode.tally.uncounted)}"
            )
        norms, dropped, read = mode.norms, mode.dropped, mode.read
        if meta is not None:  # storages of the meta copy -> the real model's
            norms = {path: replace(n, keys=tuple(meta.real(n.keys))) for path, n in norms.items()}
            dropped, read = meta.real(dropped), meta.real(read)
        self.samples += float(samples)
        self._tally.merge(mode.tally)
        self._norms.update(norms)
        self._dropped |= dropped
        self._read |= read
        self._meta |= table.meta

    def report(self) -> Report:
        """Storage of the model as it is now; operations averaged over all samples/tokens measured."""
        if self.samples <= 0:
            raise MicronetError("nothing measured yet: run the model inside counter.measure(samples=N)")
        table = self._weights()
        for key in self._read:
            if key in table.by_key:
                table.by_key[key].read = True
        stored = account(table, list(self._norms.values()), self._dropped, self.policy)
        n = self.samples
        tally = self._tally
        total_flops = sum(r[3] for r in tally.rows.values()) / n
        order = {path: i for i, path in enumerate(self._modules)}
        layers = []
        for path in sorted(set(stored) | set(tally.rows), key=lambda p: order.get(p, len(order))):
            s = stored.get(path)
            m, a, o, f = (v / n for v in tally.rows.get(path, [0.0] * 4))
            module = self._modules.get(path)
            layers.append(
                LayerRow(
                    name=path,
                    type=type(module).__name__ if module is not None else "",
                    params=s.params if s else 0,
                    nonzeros=s.nonzeros if s else 0,
                    density=(s.nonzeros / s.params) if s and s.params else None,
                    bits=s.bits if s else None,
                    storage=s.storage if s else 0.0,
                    mults=m,
                    adds=a,
                    others=o,
                    flops=f,
                    share=f / total_flops if total_flops else 0.0,
                )
            )
        ops = [
            OpTotal(family=fam, calls=int(v[0]), mults=v[1] / n, adds=v[2] / n, others=v[3] / n, flops=v[4] / n)
            for fam, v in sorted(tally.families.items(), key=lambda kv: -kv[1][4])
        ]
        uncounted = [
            UncountedOp(op=op, module=mod, calls=c, elements=e) for (op, mod), (c, e) in tally.uncounted.items()
        ]
        warnings = []
        if self._meta or table.meta:
            warnings.append("meta tensors have no values: their density is unknown, so weights are counted dense")
        if uncounted:
            warnings.append(
                f"{len(uncounted)} op(s) have no price in rule set {self.rules.name} and are not counted: "
                f"{_describe(tally.uncounted)}"
            )
        params = sum(row.storage for row in layers)
        flops = sum(row.flops for row in layers)
        return Report(
            rules=self.rules.name,
            track=self.track,
            samples=n,
            per=self.per,
            params=params,
            flops=flops,
            mults=sum(row.mults for row in layers),
            adds=sum(row.adds for row in layers),
            others=sum(row.others for row in layers),
            score=self.rules.score(params, flops, self.track) if self.track else None,
            layers=layers,
            ops=ops,
            uncounted=uncounted,
            conversions=tally.conversions,
            warnings=warnings,
        )


@contextmanager
def _installed(mode: CountingMode) -> Iterator[None]:
    """The counting mode and the module hooks that attribute its ops, for the duration of a forward."""
    pre = register_module_forward_pre_hook(mode.enter)
    post = register_module_forward_hook(mode.leave)
    try:
        with mode:
            yield
        mode.first_input_seen = mode.first_input
    finally:
        pre.remove()
        post.remove()
        mode.finish()


def _same(a: list[tuple[str, torch.Tensor, int]], b: list[tuple[str, torch.Tensor, int]]) -> bool:
    return len(a) == len(b) and all(x[0] == y[0] and x[1] is y[1] and x[2] == y[2] for x, y in zip(a, b))


_BUNDLED: dict[str, RuleSet] = {}


def _load_rules(rules: str | RuleSet) -> RuleSet:
    """A bundled rule set is parsed once per process (rule sets are frozen); files are read every time."""
    if isinstance(rules, str) and rules in _BUNDLED:
        return _BUNDLED[rules]
    loaded = load_rules(rules)
    if isinstance(rules, str) and loaded.source == f"{rules} (bundled)":
        _BUNDLED[rules] = loaded
    return loaded


def _describe(uncounted: dict[tuple[str, str], list[int]]) -> str:
    return ", ".join(f"{op} in {module or '<root>'} ({calls}x)" for (op, module), (calls, _) in uncounted.items())


def count(
    model: nn.Module,
    *example_inputs: Any,
    rules: str | RuleSet = "micronet-2019",
    track: str | None = None,
    bits: int | None = None,
    act_bits: int | None = None,
    weight_bits: Mapping[str, int] | None = None,
    freebie: bool = False,
    strict: bool = False,
    backend: str = "dispatch",
    samples: float | None = None,
    sample_dim: int = 0,
    shape_only: bool = False,
    **forward_kwargs: Any,
) -> Report:
    """Run ``model(*example_inputs, **forward_kwargs)`` once and report its cost by the rule set.

    ``shape_only``: run the forward on a meta copy of the model instead (no values computed; the model is only
    read), priced with the real model's widths, densities and storage: the same totals as a real run, for
    models whose control flow does not depend on data (see :meth:`Counter.count_shapes`)."""
    if backend == "fvcore":
        if shape_only:
            raise MicronetError("shape_only counts with the dispatch backend, not fvcore")
        from micronet_score.counting.fvcore_backend import count_fvcore

        return count_fvcore(
            model,
            example_inputs,
            rules=rules,
            track=track,
            bits=bits,
            act_bits=act_bits,
            weight_bits=weight_bits,
            freebie=freebie,
            strict=strict,
            samples=samples,
            sample_dim=sample_dim,
            forward_kwargs=forward_kwargs,
        )
    if backend != "dispatch":
        raise MicronetError(f"unknown backend {backend!r} (known: dispatch, fvcore)")
    counter = Counter(
        model,
        rules=rules,
        track=track,
        bits=bits,
        act_bits=act_bits,
        weight_bits=weight_bits,
        freebie=freebie,
        strict=strict,
    )
    if samples is None and example_inputs and isinstance(example_inputs[0], torch.Tensor):
        samples = example_inputs[0].shape[sample_dim] if example_inputs[0].dim() > sample_dim else 1
    counter._pending_walk = counter._walk  # nothing changes the model between these two steps (its forward may)
    if shape_only:
        counter.count_shapes(*example_inputs, samples=samples, sample_dim=sample_dim, **forward_kwargs)
    else:
        with counter.measure(samples=samples, sample_dim=sample_dim):
            model(*example_inputs, **forward_kwargs)
    return counter.report()


def count_shapes(model: nn.Module, *example_inputs: Any, **options: Any) -> Report:
    """:func:`count` with ``shape_only=True``: the forward on a meta copy, the real model's widths and densities."""
    return count(model, *example_inputs, shape_only=True, **options)
