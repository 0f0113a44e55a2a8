"""Measure a loaded model by the rules: on data (with its quality metric) or on an example input.

This is what ``eval``, ``count``, ``breakdown`` and ``compare`` share: one Counter per model, run over the real
test data when it is given (so data-dependent costs are averaged over the data, as the rules ask) or over the
architecture's example input otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from micronet_score.checkpoint import LoadedModel
from micronet_score.counting import Counter
from micronet_score.errors import MicronetError
from micronet_score.report import Quality, Report
from micronet_score.ruleset import DEFAULT_RULES, RuleSet, load_rules


@dataclass(frozen=True)
class CountOptions:
    """The rule set, track and declared widths of a measurement."""

    rules: str | RuleSet = DEFAULT_RULES
    track: str | None = None
    bits: int | None = None
    act_bits: int | None = None
    freebie: bool = False
    strict: bool = False


def track_of(loaded: LoadedModel, options: CountOptions) -> str | None:
    """The track asked for, else the bundled architecture's own."""
    if options.track:
        return options.track
    return loaded.spec.track if loaded.spec else None


def make_counter(loaded: LoadedModel, options: CountOptions) -> Counter:
    """A Counter for the model. A model that declares its own weight widths (``declared_weight_bits``, e.g. the
    MIT model: quantized tensors at ``bits``, position table and layer norms unquantized) gets them at ``--bits``,
    or at the ``bits`` of its configuration when its file carries quantizers."""
    model = loaded.model
    bits = options.bits
    declares = callable(getattr(model, "declared_weight_bits", None))
    if bits is None and declares and loaded.config.get("quantized") and loaded.config.get("bits"):
        bits = int(loaded.config["bits"])
    weight_bits = model.declared_weight_bits(bits) if declares and bits is not None else None
    return Counter(
        model, rules=options.rules, track=track_of(loaded, options), bits=bits, act_bits=options.act_bits,
        weight_bits=weight_bits, freebie=options.freebie, strict=options.strict,
    )


def _samples(first: Any, per: str) -> int:
    if not isinstance(first, Tensor) or first.dim() == 0:
        return 1
    if per == "token" and not first.is_floating_point():
        return first.numel()
    return first.shape[0]


def measure_example(loaded: LoadedModel, options: CountOptions, device: str | torch.device = "cpu") -> Report:
    """Count one forward over the example input (the architecture's, or the one a program was exported with)."""
    if loaded.example_inputs is not None:
        inputs = loaded.example_inputs
    elif loaded.spec is not None and loaded.spec.example_inputs is not None:
        inputs = loaded.spec.example_inputs(loaded.model)
    else:
        raise MicronetError(f"no example input known for {loaded.name}: give the data to evaluate on")
    inputs = tuple(x.to(device) if isinstance(x, Tensor) else x for x in inputs)
    counter = make_counter(loaded, options)
    loaded.model.to(device)
    with torch.no_grad(), counter.measure(samples=_samples(inputs[0] if inputs else None, counter.per)):
        loaded.model(*inputs)
    return counter.report()


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
    tokens = load_split(data, split, vocab)
    stream = model if callable(getattr(model, "new_stream", None)) else _LogProbStream(model)
    counter = make_counter(loaded, options)
    result = evaluate_stream(stream, torch.as_tensor(tokens), split=split, limit_tokens=limit_tokens,
                             device=device, counter=counter, progress=progress)
    report = counter.report()
    track = load_rules(options.rules).track(report.track) if report.track else None
    warnings = list(report.warnings)
    complete = result.predictions == len(tokens) - 1
    if not complete:
        warnings.append(f"perplexity over the first {result.predictions:,} of {len(tokens) - 1:,} predictions only: "
                        "not the official figure")
    quality = Quality(
        metric="perplexity", value=result.perplexity, threshold=track.threshold if track else float("nan"),
        qualifies=bool(track and complete and track.qualifies(result.perplexity)),
    )
    return report.model_copy(update={"quality": quality, "warnings": warnings})


def measure_images(
    loaded: LoadedModel,
    options: CountOptions,
    data: str | os.PathLike,
    *,
    labels: str | os.PathLike | None = None,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Report:
    """Top-1 correct on a CIFAR-100 archive (``data`` = the ``test`` file or its folder/.tar.gz) or an ImageNet
    folder (with ``labels``), with the operations counted per image in the same pass."""
    from micronet_score.data.images import load_cifar100_test, load_image_folder
    from micronet_score.evaluate_images import evaluate_top1

    track = track_of(loaded, options)
    if track is None:
        raise MicronetError("name the track (--track cifar100 or imagenet) to judge the accuracy")
    images = load_image_folder(data, labels) if labels else load_cifar100_test(Path(data))
    counter = make_counter(loaded, options)
    result = evaluate_top1(loaded.model, images, track, options.rules, batch_size=batch_size, progress=progress,
                           device=str(device), counter=counter)
    report = counter.report()
    warnings = list(report.warnings)
    if not result.complete:
        warnings.append(f"{result.total:,} images evaluated, not the track's whole test set: not the official figure")
    quality = Quality(metric=f"top1_correct of {result.total}", value=result.correct, threshold=result.threshold,
                      qualifies=result.qualifies and result.complete)
    return report.model_copy(update={"quality": quality, "warnings": warnings})
