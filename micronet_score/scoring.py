"""Measure a loaded model by the rules: on data (with its quality metric) or on an example input.

This is what ``eval``, ``count``, ``breakdown`` and ``compare`` share: one Counter per model, run over the real
test data when it is given (so data-dependent costs are averaged over the data, as the rules ask) or over the
architecture's example input otherwise.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from micronet_score.checkpoint import LoadedModel
from micronet_score.counting import Counter
from micronet_score.counting.api import samples_of, training_state_kept
from micronet_score.errors import MicronetError
from micronet_score.options import CountOptions
from micronet_score.report import Quality, Report


class Interrupted(MicronetError):
    """A measurement stopped by the user (Ctrl-C). ``samples`` are the samples/tokens measured before it stopped
    (whole batches or chunks only); ``report`` is what they cost (None when nothing was measured)."""

    def __init__(self, samples: float, total: float | None, per: str, report: Report | None):
        self.samples, self.total, self.per, self.report = samples, total, per, report
        of = f" of {total:,.0f}" if total is not None else ""
        text = f"interrupted after {samples:,.0f}{of} {per}s evaluated"
        if report is not None:
            text += (f" (so far: {report.flops:.6g} operations per {per}, storage {report.params:.6g}"
                     + (f", score {report.score:.6g}" if report.score is not None else "") + ")")
        super().__init__(text + "; no result")


def track_of(loaded: LoadedModel, options: CountOptions) -> str | None:
    """The track asked for, else the bundled architecture's own."""
    if options.track:
        return options.track
    return loaded.spec.track if loaded.spec else None


def make_counter(loaded: LoadedModel, options: CountOptions) -> Counter:
    """A Counter for the model, on the track asked for (else the bundled architecture's own), with the widths
    the model declares (see :meth:`CountOptions.declared_by`)."""
    options = replace(options.declared_by(loaded.config), track=track_of(loaded, options))
    return Counter(loaded.model, options)


def nonfinite_tensors(model: nn.Module) -> list[str]:
    """Names of the model's parameters and buffers holding NaN or Inf (meta tensors have no values)."""
    names = []
    for name, tensor in chain(model.named_parameters(), model.named_buffers()):
        if tensor.is_meta or not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        with torch.no_grad():
            if not bool(torch.isfinite(tensor).all()):
                names.append(name)
    return names


def _finish(report: Report, model: nn.Module, warnings: list[str] | None = None,
            quality: Quality | None = None) -> Report:
    """The report with its quality and warnings, non-finite weights named."""
    warnings = list(report.warnings if warnings is None else warnings)
    bad = nonfinite_tensors(model)
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        warnings.append(f"{len(bad)} weight tensor(s) hold NaN or Inf values: {shown}; they are counted as "
                        "stored, but the model's outputs are not meaningful")
    update: dict[str, Any] = {"warnings": warnings}
    if quality is not None:
        update["quality"] = quality
    return report.model_copy(update=update)


@contextmanager
def _measuring(loaded: LoadedModel, counter: Counter | None, total: float | None = None) -> Iterator[None]:
    """Run the model in evaluation mode and give every module its training flag back afterwards; a failing
    forward becomes one clear error, Ctrl-C an :class:`Interrupted` with what was measured so far."""
    model = loaded.model
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
    except NotImplementedError:
        pass  # a torch.export program: its mode was fixed when it was exported
    try:
        with training_state_kept(model):
            yield
    except KeyboardInterrupt:
        if counter is None:
            raise
        report = counter.report() if counter.samples > 0 else None
        raise Interrupted(counter.samples, total, counter.per, report) from None
    except MicronetError:
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise MicronetError(f"{loaded.name}: the model's forward failed ({type(exc).__name__}"
                            + (f": {text[0]}" if text else "") + ")") from exc
    finally:
        for module, training in flags:
            module.training = training


def measure_example(
    loaded: LoadedModel, options: CountOptions, device: str | torch.device = "cpu", shape_only: bool = False,
    inputs: Sequence[str] | None = None,
) -> Report:
    """Count one forward over the example input (``inputs``: ``--input`` specs; else see
    :func:`micronet_score.inputs.example_inputs`); ``shape_only`` runs it on a meta copy (nothing computed, same
    totals) for models whose control flow does not depend on values."""
    from micronet_score.inputs import example_inputs

    inputs = example_inputs(loaded, options.ruleset(), track_of(loaded, options), inputs)
    inputs = tuple(x.to(device) if isinstance(x, Tensor) else x for x in inputs)
    counter = make_counter(loaded, options)
    loaded.model.to(device)
    samples = samples_of(inputs, {}, counter.per, None)
    with _measuring(loaded, counter), torch.no_grad():
        if shape_only:
            counter.count_shapes(*inputs, samples=samples)
        else:
            with counter.measure(samples=samples):
                loaded.model(*inputs)
    return _finish(counter.report(), loaded.model)


class _LogProbStream(nn.Module):
    """A model returning full log-probabilities ``model(tokens[T, 1], state) -> (log_probs[T, 1, V], state)``
    seen as a streaming LM (``new_stream``; ``(inputs, targets, state) -> (nll, state)``).

    Only the model's own forward is counted: picking the targets' log-probabilities is a lookup (free), and the
    sign of ``nll = -log p`` is the evaluation's, not the model's arithmetic, so it is a lazily negated view
    (materialised by the evaluator after the counted forward)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def new_stream(self, device: Any = None) -> Any:
        return None

    def forward(self, inputs: Tensor, targets: Tensor, state: Any) -> tuple[Tensor, Any]:
        log_probs, state = self.model(inputs[:, None], state)
        return torch._neg_view(log_probs[:, 0].gather(1, targets[:, None])[:, 0]), state


def _stream(loaded: LoadedModel, tokens: Tensor, vocabulary: int, device: str | torch.device
            ) -> tuple[nn.Module, int | None]:
    """The model as a streaming LM, and its chunk: a model with ``new_stream`` streams itself; a bundled
    architecture without one returns time-major log-probabilities; any other model follows the documented
    convention of :mod:`micronet_score.token_lm` (checked for its vocabulary and causality first)."""
    from micronet_score.evaluate_lm import resolve_device
    from micronet_score.token_lm import TokenLM, exported_length

    model = loaded.model
    if callable(getattr(model, "new_stream", None)):
        return model, None
    if loaded.spec is not None:
        return _LogProbStream(model), None
    stream = TokenLM(model, exported_length(loaded.example_inputs)).to(resolve_device(device)).eval()
    with _measuring(loaded, None):
        stream.check(tokens.to(resolve_device(device)), vocabulary)
    return stream, stream.chunk


def measure_lm(
    loaded: LoadedModel,
    options: CountOptions,
    data: str | os.PathLike,
    split: str = "test",
    *,
    vocab_file: str | os.PathLike | None = None,
    limit_tokens: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> Report:
    """Perplexity of one WikiText split under the official protocol, with the operations counted in the same
    pass (averaged over the tokens actually evaluated)."""
    from micronet_score.data.wikitext import load_split, load_vocabulary
    from micronet_score.evaluate_lm import evaluate_stream

    model = loaded.model
    order = getattr(model, "vocabulary_order", "frequency")
    vocab = load_vocabulary(data, order=order, vocab_file=vocab_file)
    n_vocab = getattr(getattr(model, "config", None), "n_vocab", None) or getattr(model, "vocabulary", None)
    if n_vocab is not None and len(vocab) != n_vocab:
        raise MicronetError(f"the vocabulary of {data} has {len(vocab)} words but the model predicts {n_vocab}"
                            " (give the authors' vocabulary file with --vocab)")
    tokens = torch.as_tensor(load_split(data, split, vocab))
    stream, chunk = _stream(loaded, tokens, len(vocab), device)
    counter = make_counter(loaded, options)
    predictions = len(tokens) - 1 if limit_tokens is None else min(len(tokens) - 1, limit_tokens)
    with _measuring(loaded, counter, total=predictions):
        result = evaluate_stream(stream, tokens, split=split, limit_tokens=limit_tokens, chunk=chunk,
                                 device=device, counter=counter, progress=progress)
    report = counter.report()
    track = options.ruleset().track(report.track) if report.track else None
    warnings = list(report.warnings)
    complete = result.predictions == len(tokens) - 1
    if not complete:
        warnings.append(f"perplexity over the first {result.predictions:,} of {len(tokens) - 1:,} predictions only: "
                        "not the official figure")
    finite = math.isfinite(result.perplexity)
    if not finite:
        warnings.append(f"perplexity is not finite ({result.perplexity}): the model gives some target a "
                        "probability of zero, or computes NaN")
    quality = Quality(
        metric="perplexity", value=result.perplexity, threshold=track.threshold if track else float("nan"),
        qualifies=bool(track and complete and finite and track.qualifies(result.perplexity)), complete=complete,
    )
    return _finish(report, model, warnings, quality)


def measure_images(
    loaded: LoadedModel,
    options: CountOptions,
    data: str | os.PathLike,
    *,
    labels: str | os.PathLike | None = None,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    progress: bool | None = False,
) -> Report:
    """Top-1 correct on a CIFAR-100 archive (``data`` = the ``test`` file or its folder/.tar.gz) or an ImageNet
    folder (with ``labels``), with the operations counted per image in the same pass; ``progress`` shows a bar
    with images per second (None: when stderr is a terminal)."""
    from micronet_score.data.images import load_cifar100_test, load_image_folder
    from micronet_score.evaluate_images import evaluate_top1

    track = track_of(loaded, options)
    if track is None:
        tracks = ", ".join(f"{name} ({t.per}s)" for name, t in options.ruleset().tracks.items())
        raise MicronetError(f"name the track to evaluate on with --track: {tracks}")
    images = load_image_folder(data, labels) if labels else load_cifar100_test(Path(data))
    counter = make_counter(loaded, options)
    with _measuring(loaded, counter, total=len(images)):
        result = evaluate_top1(loaded.model, images, track, options.rules,
                               batch_size=loaded.meta.get("batch_size", batch_size),
                               progress=progress, device=str(device), counter=counter)
    report = counter.report()
    warnings = list(report.warnings)
    if not result.complete:
        warnings.append(f"{result.total:,} images evaluated, not the track's whole test set: not the official figure")
    quality = Quality(metric=f"top1_correct of {result.total}", value=result.correct, threshold=result.threshold,
                      qualifies=result.qualifies and result.complete, complete=result.complete)
    return _finish(report, loaded.model, warnings, quality)


def measure_directory(
    directory: str | os.PathLike, options: CountOptions, *, progress: bool | None = None, **streaming: Any
) -> Report:
    """Count a Hugging Face model directory from its files without loading it (a model larger than memory):
    storage streamed from its safetensors shards, operations from a meta-device forward of the architecture of
    its ``config.json`` on the example token sequence; declared widths (``bits``, ``act_bits``) audited against
    the values streamed, violations as warnings (an error with ``strict``). ``streaming``: ``tokens``,
    ``chunk_bytes`` (see :func:`micronet_score.streamed_count.count_directory`)."""
    from micronet_score.streamed_count import count_directory

    counter_options = {"rules": options.rules, "track": options.track, "bits": options.bits,
                       "act_bits": options.act_bits, "freebie": options.freebie, "strict": options.strict,
                       "representation": options.representation}
    report, audited = count_directory(Path(directory), counter_options, progress=progress, **streaming)
    if options.bits is None and options.act_bits is None:
        return report
    if options.strict:
        audited.raise_if_violations()
    warnings = [f"audit: {v.message}" for v in audited.violations]
    if not audited.tensors and options.bits is not None:
        warnings.append("audit: no weights in the directory, so the declared widths could not be checked")
    return report.model_copy(update={"warnings": [*report.warnings, *warnings]}) if warnings else report
