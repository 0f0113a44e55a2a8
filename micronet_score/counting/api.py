"""The Python API: ``count`` for one forward, ``Counter`` for measuring inside a training or evaluation loop."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from micronet_score.counting.assemble import build_report
from micronet_score.counting.bits import BitPolicy
from micronet_score.counting.blocks import Blocks
from micronet_score.counting.costs import Prices
from micronet_score.counting.interpreter import CountingMode, PricingMemo, Tally, Uncounted
from micronet_score.counting.representation import Weights, check_choice, worth_tiling
from micronet_score.counting.shapes import (
    META_FALLBACKS,
    META_FAST,
    MetaCopy,
    data_dependent,
    to_meta,
)
from micronet_score.counting.storage import FoldedNorm, Walk, WeightTable, account, settle
from micronet_score.errors import MicronetError
from micronet_score.hints import unquantized_names
from micronet_score.options import OPTION_NAMES, CountOptions
from micronet_score.report import Report, UncountedOp


@dataclass
class Measured:
    """What the forwards counted so far add up to (storage is read from the model when the report is made)."""

    samples: float = 0.0
    tally: Tally = field(default_factory=Tally)
    norms: dict[str, FoldedNorm] = field(default_factory=dict)
    dropped: set[int] = field(default_factory=set)
    read: set[int] = field(default_factory=set)
    meta: bool = False
    training: set[str] = field(default_factory=set)
    """modules in training mode during a counted forward"""
    backward_ops: int = 0
    """ops of autograd's backward pass seen while measuring (never counted)"""
    ran: set[str] = field(default_factory=set)
    """paths of the modules whose forward ran (parameters of the others, read by no op, are not stored)"""


class Counter:
    """Counts every forward run inside :meth:`measure`; :meth:`report` averages over all samples measured.
    :meth:`snapshot` gives the cost of the model as deployed, now, at any point of training."""

    def __init__(self, model: nn.Module, options: CountOptions | None = None, **settings: Any):
        """``options`` and/or the settings of :class:`~micronet_score.options.CountOptions` as keywords
        (``rules``, ``track``, ``bits``, ``act_bits``, ``weight_bits``, ``freebie``, ``strict``,
        ``representation``)."""
        if not isinstance(model, nn.Module):
            raise MicronetError(f"can only count a torch.nn.Module (got {type(model).__name__})")
        self.options = options = CountOptions.of(options, **settings)
        self.model = model
        self.rules = options.ruleset()
        self.track = options.track_name()
        self.per = self.rules.tracks[self.track].per if self.track else "sample"
        walk = Walk.of(model)
        self.policy = BitPolicy(self.rules, options.bits, options.act_bits, dict(options.weight_bits or {}),
                                options.freebie, unquantized_names(walk.modules.items()))
        self.strict = options.strict
        self.representation = check_choice(options.representation, self.rules)
        self._choice_weights = Weights.of(self.rules, self.track)
        self.prices = Prices(self.rules)
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
        """A walk known to be current, used once (count() runs the model right after walking it)."""
        self._meta_copy: tuple[WeightTable, MetaCopy] | None = None
        """count_shapes and snapshot: the meta copy, made once per weight table"""
        self._memo: PricingMemo | None = None
        """the pricing hints' references priced so far, for the current weight table (see CountingMode.hint)"""
        self._shared: tuple[Any, ...] = ()
        """objects the meta copy refers to instead of copying (an integration's trainer)"""
        self.reset()

    def _weights(self) -> WeightTable:
        """The weight table, rebuilt when the model's tensors changed, else refreshed where values changed."""
        walk, self._pending_walk = self._pending_walk or Walk.of(self.model), None
        keys = walk.identity()
        if self._table is None or not _same(keys, self._table_keys):
            self._table = WeightTable.of(self.model, self.policy, walk, self.representation)
            self._table_keys = keys
        else:
            self._table.refresh(self.model, walk)
        return self._table

    def measured_elsewhere(
        self, nonzeros: Mapping[str, int], tilings: Mapping[str, list[Blocks]] | None = None
    ) -> None:
        """Nonzeros (and every candidate block tiling) by tensor name, measured outside the model: for a model on
        the meta device whose values live in files (streamed from them), they stand for the values its meta
        tensors lack. Named tensors then count as known, in storage, in the choice of their representation and in
        the densities of their operations; the others stay as they are."""
        table = self._weights()
        mask = self.rules.mask
        for info in table.by_key.values():
            name = next((n for n in info.names if n in nonzeros), None)
            if name is None:
                continue
            info.nonzeros, info.known = nonzeros[name], True
            found = (tilings or {}).get(name) or []
            info.blocks = found if worth_tiling(info.numel, info.nonzeros, info.bits, mask, table.choice) else []
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
        self._measured = Measured()

    @property
    def samples(self) -> float:
        """Samples (tokens on a language track) measured so far."""
        return self._measured.samples

    @contextmanager
    def measure(self, samples: float | None = None, sample_dim: int | None = None) -> Iterator[Counter]:
        """Count every forward of the model run inside, as it runs (in the model's mode: a training-mode
        forward is counted as such, and the report says so; :meth:`snapshot` counts the inference graph).
        Autograd's backward pass, if run inside, is never counted (the report says so).

        ``samples``: the samples they cover, inferred when not given: on a language track every token position
        of the model's first input (integer token ids), else its size along ``sample_dim`` (default 0)."""
        table = self._weights()
        training = self._training_modules()
        mode = self._real_mode(table)
        with _installed(mode, self._measured.ran):
            yield self
        self._collect(mode, table, samples, sample_dim, None, self._measured, training)

    def count_shapes(
        self, *inputs: Any, samples: float | None = None, sample_dim: int | None = None, **forward_kwargs: Any
    ) -> Counter:
        """Count ``model(*inputs, **forward_kwargs)`` from shapes alone: the forward runs on a meta copy of the
        model (nothing is computed, the model itself is only read) and is priced with the real model's widths,
        densities and storage, so the totals equal a real forward's. The forward's control flow must not depend
        on tensor values (else MicronetError: count without shape_only). Returns the counter (call report()).

        The meta copy is made on the first call and kept while the model's tensors stay the same (it follows
        train()/eval()); the nonzeros are recounted, as for measure(), only for tensors changed since."""
        self._shape_pass(inputs, forward_kwargs, samples, sample_dim, self._measured, inference=False)
        return self

    def snapshot(
        self,
        *inputs: Any,
        samples: float | None = None,
        sample_dim: int | None = None,
        training: bool = False,
        shape_only: bool = True,
        **forward_kwargs: Any,
    ) -> Report:
        """The cost of the model now, as deployed: one forward of ``model(*inputs, **forward_kwargs)`` with the
        current weights (nonzeros, widths, quantizers) in inference mode (eval(): batch norm folded, no dropout)
        whatever mode the model is in, reported on its own (what :meth:`measure` accumulated is left alone).

        Cheap enough for every step: by default the forward runs on the cached meta copy (see
        :meth:`count_shapes`; nonzeros recounted only for tensors changed since the last call). The training
        state is never touched: parameters, buffers, running statistics, modes, torch's CPU and CUDA random
        generators, and no autograd graph is recorded. ``shape_only=False`` runs the real model instead (for a
        forward that depends on values), in eval mode under no_grad, its buffers and random state restored.
        ``training=True`` counts the training-mode graph instead (batch statistics, dropout); the report says so."""
        measured = Measured()
        samples = samples if samples is not None else samples_of(inputs, forward_kwargs, self.per, sample_dim)
        if shape_only:
            with _random_state_kept():
                self._shape_pass(inputs, forward_kwargs, samples, None, measured, inference=not training)
        else:
            self._real_pass(inputs, forward_kwargs, samples, measured, inference=not training)
        return self._report(measured)

    def _shape_pass(
        self,
        inputs: tuple,
        forward_kwargs: dict[str, Any],
        samples: float | None,
        sample_dim: int | None,
        into: Measured,
        inference: bool,
    ) -> None:
        """One forward on the meta copy, in eval mode (``inference``) or in the real modules' modes."""
        table = self._weights()
        if self._meta_copy is None or self._meta_copy[0] is not table:  # the table is rebuilt when tensors change
            self._meta_copy = (table, MetaCopy.of(self.model, Walk.of(self.model), self._shared))
        meta = self._meta_copy[1]
        meta.follow(self._modules)
        training = self._training_modules()
        if inference:
            for module in meta.walk.modules.values():
                module.training = False
            training = set()
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
            with _installed(mode, into.ran), torch.no_grad():
                meta.model(*meta_inputs, **meta_kwargs)
        except MicronetError:
            raise
        except (RuntimeError, NotImplementedError, TypeError, ValueError, IndexError) as err:
            raise data_dependent(err) from err
        self._collect(mode, table, samples, sample_dim, meta, into, training)

    def _real_pass(
        self, inputs: tuple, forward_kwargs: dict[str, Any], samples: float, into: Measured, inference: bool
    ) -> None:
        """One forward of the real model under no_grad, in eval mode (``inference``) or in its own modes; its
        modes, buffers and random state are given back as they were."""
        with training_state_kept(self.model), torch.no_grad():
            if inference:
                _eval(self.model)
            table = self._weights()
            training = self._training_modules()
            mode = self._real_mode(table)
            with _installed(mode, into.ran):
                self.model(*inputs, **forward_kwargs)
            self._collect(mode, table, samples, None, None, into, training)

    def _real_mode(self, table: WeightTable) -> CountingMode:
        """The counting mode of a forward of the real model, with the pricing memo of ``table``."""
        mode = CountingMode(self.prices, self.policy, table, self._names, self._output_bits)
        if self._memo is None or self._memo.table is not table:
            self._memo = PricingMemo(table)
        mode.memo = self._memo
        return mode

    def _training_modules(self) -> set[str]:
        return {path for path, module in self._modules.items() if module.training}

    def _collect(
        self,
        mode: CountingMode,
        table: WeightTable,
        samples: float | None,
        sample_dim: int | None,
        meta: MetaCopy | None,
        into: Measured,
        training: set[str],
    ) -> None:
        if samples is None:
            samples = samples_of((mode.first_input_seen,), {}, self.per, sample_dim)
        if self.strict and mode.tally.uncounted:
            raise MicronetError(
                f"strict mode: ops without a price in rule set {self.rules.name}: {_describe(mode.tally.uncounted)}"
            )
        norms, dropped, read = mode.norms, mode.dropped, mode.read
        if meta is not None:  # storages of the meta copy -> the real model's
            norms = {path: replace(n, keys=tuple(meta.real(n.keys))) for path, n in norms.items()}
            dropped, read = meta.real(dropped), meta.real(read)
        for path, *counts in settle(mode.dot_uses, table, self.policy, float(samples), self._choice_weights):
            mode.tally.adjust(path, "dot_product", *counts)
        into.samples += float(samples)
        into.tally.merge(mode.tally)
        into.norms.update(norms)
        into.dropped |= dropped
        into.read |= read
        into.meta |= table.meta
        into.training |= training
        into.backward_ops += mode.backward_ops

    def report(self) -> Report:
        """Storage of the model as it is now; operations averaged over all samples/tokens measured."""
        if self.samples <= 0:
            raise MicronetError("nothing measured yet: run the model inside counter.measure(samples=N)")
        return self._report(self._measured)

    def _report(self, measured: Measured) -> Report:
        table = self._weights()
        for key in measured.read:
            if key in table.by_key:
                table.by_key[key].read = True
        storage = account(
            table, list(measured.norms.values()), measured.dropped, self.policy, self._choice_weights, measured.ran
        )
        tally = measured.tally
        uncounted = [
            UncountedOp(op=op, module=mod, calls=u.calls, elements=u.elements)
            for (op, mod), u in tally.uncounted.items()
        ]
        warnings = _loop_warnings(measured)
        if measured.meta or table.meta:
            warnings.append("meta tensors have no values: their density is unknown, so weights are counted dense")
        if uncounted:
            warnings.append(
                f"{len(uncounted)} op(s) have no price in rule set {self.rules.name} and are not counted: "
                f"{_describe(tally.uncounted)}"
            )
        return build_report(
            self.rules, self.track, measured.samples, storage, self._modules, tally.rows, tally.families, uncounted,
            warnings, tally.conversions,
        )


def samples_of(inputs: tuple, forward_kwargs: Mapping[str, Any], per: str, sample_dim: int | None) -> float:
    """Samples a forward covers, from its first input (the first positional argument, else the first tensor
    among keyword arguments): on a language track every token position of integer token ids, else the size
    along ``sample_dim`` (default 0; a 0-d input is one sample). Where it cannot tell: MicronetError naming
    ``samples=``."""
    first = inputs[0] if inputs else next((v for v in forward_kwargs.values() if isinstance(v, torch.Tensor)), None)
    if per == "token":
        if sample_dim is not None:
            raise MicronetError(
                "on a language track every token position is a sample, so sample_dim does not apply: "
                "pass samples=<tokens> instead"
            )
        if isinstance(first, torch.Tensor) and not (
            first.is_floating_point() or first.is_complex() or first.dtype == torch.bool
        ):
            return float(first.numel())
        what = f"a {first.dtype} tensor" if isinstance(first, torch.Tensor) else type(first).__name__
        raise MicronetError(
            f"cannot tell how many tokens the forward covers (the model's first input is {what}, not integer "
            "token ids): pass samples=<tokens>, every token position the model predicts"
        )
    dim = 0 if sample_dim is None else sample_dim
    if isinstance(first, torch.Tensor):
        if first.dim() > dim:
            return float(first.shape[dim])
        if first.dim() == 0:
            return 1.0
    raise MicronetError("cannot infer the number of samples: pass samples=N")


def _loop_warnings(measured: Measured) -> list[str]:
    """What a loop measured that inference would not do."""
    warnings = []
    if measured.training:
        shown = sorted(measured.training, key=lambda p: (p.count("."), p))
        names = ", ".join(repr(p) if p else "<root>" for p in shown[:5])
        more = f" and {len(shown) - 5} more" if len(shown) > 5 else ""
        warnings.append(
            f"a training-mode forward was counted (modules in training mode: {names}{more}): batch statistics, "
            "dropout and any other training-only work are included, so this is not the inference cost "
            "(counter.snapshot() and count() count the inference graph)"
        )
    if measured.backward_ops:
        warnings.append(
            f"autograd's backward pass ran while measuring ({measured.backward_ops} ops): backward work is "
            "training, not inference, and was not counted"
        )
    return warnings


def _eval(model: nn.Module) -> None:
    """Eval mode (a torch.export program's module refuses eval(): its mode was fixed when it was exported)."""
    try:
        model.eval()
    except NotImplementedError:
        pass


@contextmanager
def _random_state_kept() -> Iterator[None]:
    """torch's CPU random generator and, when CUDA is in use, every CUDA generator, as they were."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextmanager
def training_state_kept(model: nn.Module) -> Iterator[None]:
    """Run something on a model in training and leave its training state as it was: every module's mode, every
    buffer (the same tensor objects, their values restored where a forward wrote them: running statistics,
    observers, counters), and the random generators; fake quantizers' observers are off meanwhile. Parameters
    are not copied (a forward under no_grad does not write them)."""
    modes = [(module, module.training) for module in model.modules()]
    buffers = [
        (module, name, tensor, tensor._version, tensor.detach().clone())
        for module in model.modules()
        for name, tensor in module._buffers.items()
        if tensor is not None and tensor.device.type != "meta"
    ]
    for module in model.modules():  # observers off: the deployed model quantizes with its stored scale and zero
        if isinstance(module, torch.ao.quantization.FakeQuantizeBase):  # point (the flag is a buffer: restored)
            module.disable_observer()
    try:
        with _random_state_kept():
            yield
    finally:
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for module, name, tensor, version, saved in buffers:
                if module._buffers.get(name) is not tensor:
                    module._buffers[name] = tensor
                if tensor._version != version or not torch.equal(tensor, saved):  # some kernels (batch norm's
                    tensor.copy_(saved)  # running statistics) write without bumping the version counter


@contextmanager
def _installed(mode: CountingMode, ran: set[str]) -> Iterator[None]:
    """The counting mode and the module hooks that attribute its ops, for the duration of a forward; the paths
    of the modules whose forward ran are added to ``ran``."""

    def enter(module: nn.Module, args: tuple) -> None:
        path = mode.names.get(id(module))
        if path is not None:
            ran.add(path)
        mode.enter(module, args)

    pre = register_module_forward_pre_hook(enter)
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


def _describe(uncounted: dict[tuple[str, str], Uncounted]) -> str:
    return ", ".join(f"{op} in {module or '<root>'} ({u.calls}x)" for (op, module), u in uncounted.items())


def count(
    model: nn.Module,
    *example_inputs: Any,
    options: CountOptions | None = None,
    backend: str = "dispatch",
    samples: float | None = None,
    sample_dim: int | None = None,
    shape_only: bool = False,
    training: bool = False,
    **kwargs: Any,
) -> Report:
    """Run ``model(*example_inputs, **forward_kwargs)`` once and report its inference cost by the rule set.

    The forward runs in eval mode under no_grad whatever mode the model is in (``training=True`` counts the
    training-mode graph instead; the report says so); the model's modes, buffers and random state are left as
    they were. Samples: see :meth:`Counter.measure`. Declared widths (``bits``, ``act_bits``, ``weight_bits``)
    are audited against what the model holds: each violation is a warning (``strict``: an error).

    ``options`` and/or the settings of :class:`~micronet_score.options.CountOptions` as keywords (``rules``,
    ``track``, ``bits``, ``act_bits``, ``weight_bits``, ``freebie``, ``strict``, ``representation``) say how to
    price it; every other keyword goes to the model's forward.

    ``shape_only``: run the forward on a meta copy of the model instead (no values computed; the model is only
    read), priced with the real model's widths, densities and storage: the same totals as a real run, for
    models whose control flow does not depend on data (see :meth:`Counter.count_shapes`)."""
    settings = {k: kwargs.pop(k) for k in OPTION_NAMES if k in kwargs}
    options, forward_kwargs = CountOptions.of(options, **settings), kwargs
    if samples is None:  # one inference for both backends: tokens on a language track
        rule_set, track = options.ruleset(), options.track_name()
        per = rule_set.tracks[track].per if track else "sample"
        samples = samples_of(example_inputs, forward_kwargs, per, sample_dim)
    if backend == "fvcore":
        if shape_only:
            raise MicronetError("shape_only counts with the dispatch backend, not fvcore")
        from micronet_score.counting.fvcore_backend import count_fvcore

        with training_state_kept(model), torch.no_grad():
            if not training:
                _eval(model)
            report = count_fvcore(model, example_inputs, options, samples=samples, forward_kwargs=forward_kwargs)
    elif backend == "dispatch":
        counter = Counter(model, options)
        counter._pending_walk = counter._walk  # nothing changes the model between these two steps (its forward may)
        report = counter.snapshot(
            *example_inputs, samples=samples, training=training, shape_only=shape_only, **forward_kwargs
        )
    else:
        raise MicronetError(f"unknown backend {backend!r} (known: dispatch, fvcore)")
    from micronet_score.audit import declared_width_warnings

    declared = declared_width_warnings(
        model, bits=options.bits, act_bits=options.act_bits, weight_bits=options.weight_bits, rules=options.rules,
        strict=options.strict,
    )
    return report.model_copy(update={"warnings": [*report.warnings, *declared]}) if declared else report


def count_shapes(model: nn.Module, *example_inputs: Any, **options: Any) -> Report:
    """:func:`count` with ``shape_only=True``: the forward on a meta copy, the real model's widths and densities."""
    return count(model, *example_inputs, shape_only=True, **options)
