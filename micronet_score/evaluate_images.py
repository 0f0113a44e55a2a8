"""Top-1 accuracy of an image classifier on a test set, judged by the rule set's threshold.

The rules compare the number of correct top-1 predictions with a hard threshold (CIFAR-100: at least 8,000 of
10,000; ImageNet: at least 37,500 of 50,000), with no rounding; the comparison itself comes from the rule set.

The evaluation is a pipeline: a background thread makes the next batches (decoding, preprocessing, normalising)
while the model runs on the current one, batched; the correct predictions are summed on the model's device and
read once at the end, so no batch waits for the previous one's result.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from micronet_score.data.images import ImageSet
from micronet_score.progress import rate_bar
from micronet_score.ruleset import RuleSet, load_rules


@dataclass(frozen=True)
class Top1Result:
    """Correct top-1 predictions out of the images seen, and whether that meets the track's threshold."""

    correct: int
    total: int
    track: str
    threshold: float
    qualifies: bool
    complete: bool
    """Whether every image of the official test set was evaluated (``total`` equals the track's test size)."""

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")


def prefetched(batches: Iterator[Any], ahead: int = 2) -> Iterator[Any]:
    """The items of ``batches``, made by a background thread up to ``ahead`` items before they are asked for. An
    exception in the producer is raised here, at the item where it happened; leaving early stops the producer."""
    items: queue.Queue = queue.Queue(maxsize=max(1, ahead))
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in batches:
                while not stop.is_set():
                    try:
                        items.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put((done, None))
        except BaseException as exc:  # handed to the consumer, raised there
            items.put((done, exc))
        finally:
            close = getattr(batches, "close", None)
            if close is not None and stop.is_set():
                close()

    thread = threading.Thread(target=produce, name="micronet-score batches", daemon=True)
    thread.start()
    try:
        while True:
            item, error = items.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue, then let it finish
            with contextlib.suppress(queue.Empty):
                items.get(timeout=0.1)


def count_top1(
    model: nn.Module,
    images: ImageSet,
    batch_size: int = 100,
    progress: bool | None = False,
    device: str = "cpu",
    counter: Any | None = None,
) -> int:
    """Number of images whose highest-scoring class is their label; the model is run in evaluation mode.

    Batches are made ahead by a background thread (:func:`prefetched`); ``counter`` (a micronet-score Counter)
    measures each batch's forward with ``samples`` = its images; ``progress`` shows a bar with images per second
    (None: when stderr is a terminal)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    try:
        with rate_bar(len(images), f"evaluating {images.name}", "images", progress) as advance, torch.no_grad():
            for batch, labels in prefetched(images.batches(batch_size)):
                with counter.measure(samples=len(labels)) if counter is not None else contextlib.nullcontext():
                    logits = model(batch.to(device, non_blocking=True))
                correct += (logits.argmax(dim=-1) == labels.to(logits.device, non_blocking=True)).sum()
                advance(len(labels))
    finally:
        model.train(was_training)
    return int(correct)


def evaluate_top1(
    model: nn.Module,
    images: ImageSet,
    track: str,
    rules: str | RuleSet = "micronet-2019",
    batch_size: int = 100,
    progress: bool | None = False,
    device: str = "cpu",
    counter: Any | None = None,
) -> Top1Result:
    """Top-1 correct count on ``images``, judged by ``track`` of the rule set (e.g. 'cifar100', 'imagenet')."""
    rule_set = load_rules(rules)
    rule = rule_set.track(track)
    correct = count_top1(model, images, batch_size, progress, device, counter)
    total = len(images)
    value = correct if rule.metric == "top1_correct" else (correct / total if total else float("nan"))
    return Top1Result(
        correct=correct,
        total=total,
        track=rule_set.track_name(track),
        threshold=rule.threshold,
        qualifies=rule.qualifies(value),
        complete=rule.test_size is None or total == rule.test_size,
    )
