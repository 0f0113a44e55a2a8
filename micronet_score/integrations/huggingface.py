"""A Hugging Face ``Trainer`` callback: the model's inference cost at every evaluation, logged through the
trainer (``trainer.log``: TensorBoard, CSV, W&B, ... whichever reporters it has; and ``log_history``).

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=test)
    trainer.add_callback(MicronetCallback(trainer, {"input_ids": ids}, track="wikitext103"))
    trainer.train()

Needs ``transformers`` (``pip install micronet-score[hf]``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from micronet_score.errors import MicronetError
from micronet_score.integrations import PREFIX, Snapshots, logged_values

try:
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - depends on the environment
    raise MicronetError("the Hugging Face callback needs transformers: pip install 'micronet-score[hf]'") from err


class MicronetCallback(TrainerCallback):
    """After each evaluation, logs ``micronet/score``, ``micronet/storage`` and ``micronet/operations`` (per
    sample or token) of the model as deployed now (:meth:`micronet_score.Counter.snapshot`: eval-mode graph,
    current weights, training state untouched), and adds them to the evaluation's metrics.

    ``inputs``: the example input (a tensor, a tuple, or keyword inputs as a dict); ``samples``: the samples or
    tokens it holds when they cannot be told from it. By default the real model runs once on it (eval mode,
    no_grad, state restored: exact for any model, negligible next to an evaluation); ``shape_only=True`` runs
    it on a cached meta copy instead. Other keywords go to :class:`micronet_score.Counter` (``track``, ``bits``,
    ``act_bits``, ...)."""

    def __init__(
        self,
        trainer: Any,
        inputs: Any,
        *,
        samples: float | None = None,
        shape_only: bool = False,
        prefix: str = PREFIX,
        **options: Any,
    ) -> None:
        self.trainer = trainer
        self.snapshots = Snapshots(inputs, samples, shape_only, **options)
        self.prefix = prefix

    def on_evaluate(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: nn.Module | None = None,
        metrics: dict | None = None,
        **kwargs: Any,
    ) -> None:
        model = model if model is not None else self.trainer.model
        values = logged_values(self.snapshots.report(model), self.prefix)
        if metrics is not None:
            metrics.update(values)
        self.trainer.log(values)
