"""One obvious path through fine-tuning, safe by default: the objects of one config, fitted and guarded.

A recipe YAML (or any LightningCLI config of :class:`MetricLearningModule` and :class:`RetrievalDataModule`) is
parsed once by :func:`deepfeat.finetune.training.config.build_training` into the real module, data module and
trainer with its callbacks. :func:`guarded_fit` runs ``trainer.fit`` on them; the trainer's
:class:`~deepfeat.finetune.training.callbacks.ExportBundle` callback then keeps the better of the fine-tuned
model and the off-the-shelf features on validation (the guard: a user never gets a model that retrieves worse
than what they already had, on the data they can see), measures both on the held-out test split and exports the
bundle. ``deepfeat fit`` runs the same callbacks through LightningCLI, so both paths train and export alike.
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl

from deepfeat.finetune.errors import ModelError
from deepfeat.finetune.training.callbacks import ExportBundle, FinetuneResult
from deepfeat.finetune.training.datamodule import RetrievalDataModule
from deepfeat.finetune.training.module import MetricLearningModule

log = logging.getLogger(__name__)

__all__ = ["FinetuneResult", "exporter_of", "guarded_fit"]


def exporter_of(trainer: pl.Trainer) -> ExportBundle:
    """The trainer's :class:`ExportBundle` callback.

    Raises:
        ModelError: the trainer has none (the guard and the export live in it).
    """
    found = [c for c in trainer.callbacks if isinstance(c, ExportBundle)]  # type: ignore[attr-defined]
    if len(found) != 1:
        raise ModelError(f"the guarded path needs exactly one ExportBundle callback in trainer.callbacks, found "
                         f"{len(found)}; add '- class_path: deepfeat.finetune.training.ExportBundle' to the YAML's "
                         f"trainer.callbacks (see recipes/configs/fashion.yaml)")
    return found[0]


def guarded_fit(module: MetricLearningModule, datamodule: RetrievalDataModule,
                trainer: pl.Trainer) -> FinetuneResult | None:
    """Fine-tune ``module`` on ``datamodule``'s train split, select and guard on val, measure on test, export.

    Under DDP (``trainer.strategy: ddp``) every rank trains and validates; rank 0 alone then chooses, measures and
    exports (the other ranks return ``None`` at once and may exit: nothing waits for them). Launched by Lightning,
    the script that called this runs again in each process of rank > 0, so code after it that writes files or
    touches Milvus belongs under ``if result is not None`` (as ``deepfeat recipe run`` does).

    Returns:
        What :class:`ExportBundle` kept and measured (the bundle is in ``result.bundle``); ``None`` on a rank > 0.

    Raises:
        DataError: the data cannot choose or measure a model (no val split, a split of one class).
        ModelError: the trainer has no ExportBundle callback, or rank 0 ended the fit without exporting.
    """
    exporter = exporter_of(trainer)
    datamodule.set_preprocessing(module.preprocessing)
    trainer.fit(module, datamodule=datamodule)
    if not trainer.is_global_zero:
        log.info("rank %d of %d: fit done; rank 0 selects, measures and exports the bundle", trainer.global_rank,
                 trainer.world_size)
        return None
    if exporter.result is None:
        raise ModelError("fit ended without an exported model (was it interrupted?); re-run with -vv and report "
                         "the log")
    return exporter.result
