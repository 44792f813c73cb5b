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


def guarded_fit(module: MetricLearningModule, datamodule: RetrievalDataModule, trainer: pl.Trainer) -> FinetuneResult:
    """Fine-tune ``module`` on ``datamodule``'s train split, select and guard on val, measure on test, export.

    Returns:
        What :class:`ExportBundle` kept and measured (on rank 0; the bundle is in ``result.bundle``).

    Raises:
        DataError: the data cannot choose or measure a model (no val split, a split of one class).
        ModelError: the trainer has no ExportBundle callback, or no result came back (a non-zero DDP rank).
    """
    exporter = exporter_of(trainer)
    datamodule.set_preprocessing(module.preprocessing)
    trainer.fit(module, datamodule=datamodule)
    if exporter.result is None:
        raise ModelError("fit ended without an exported model (only rank 0 exports under DDP); read the result on "
                         "rank 0, or re-run with -vv and report the log")
    return exporter.result
