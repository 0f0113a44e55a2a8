"""A PyTorch Lightning callback: the model's inference cost at the end of every training epoch, logged with
``LightningModule.log_dict`` (so through the trainer's loggers: TensorBoard, CSV, W&B, ...).

    trainer = pl.Trainer(max_epochs=10, callbacks=[MicronetCallback(torch.randn(1, 3, 32, 32), track="cifar100")])
    trainer.fit(module, loader)

Needs ``pytorch-lightning`` (``pip install micronet-score[lightning]``).
"""

from __future__ import annotations

from typing import Any

from micronet_score.errors import MicronetError
from micronet_score.integrations import PREFIX, Snapshots, logged_values

try:
    import pytorch_lightning as pl
except ImportError as err:  # pragma: no cover - depends on the environment
    raise MicronetError(
        "the Lightning callback needs pytorch-lightning: pip install 'micronet-score[lightning]'"
    ) from err


class MicronetCallback(pl.Callback):
    """At the end of each training epoch, logs ``micronet/score``, ``micronet/storage`` and
    ``micronet/operations`` (per sample or token) of the LightningModule as deployed now
    (:meth:`micronet_score.Counter.snapshot` on ``module(*inputs)``: eval-mode graph, current weights, training
    state untouched).

    ``inputs``: the example input of the module's forward (a tensor, a tuple, or keyword inputs as a dict);
    ``samples``: the samples or tokens it holds when they cannot be told from it. By default the real module
    runs once on it (eval mode, no_grad, state restored: exact for any model, negligible next to an epoch);
    ``shape_only=True`` runs it on a cached meta copy instead. Other keywords go to
    :class:`micronet_score.Counter` (``track``, ``bits``, ...)."""

    def __init__(
        self,
        inputs: Any,
        *,
        samples: float | None = None,
        shape_only: bool = False,
        prefix: str = PREFIX,
        **options: Any,
    ) -> None:
        self.snapshots = Snapshots(inputs, samples, shape_only, **options)
        self.prefix = prefix

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        report = self.snapshots.report(pl_module, shared=(trainer,))  # the meta copy points to the same trainer
        pl_module.log_dict(logged_values(report, self.prefix), on_step=False, on_epoch=True)
