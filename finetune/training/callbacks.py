"""Training callbacks: the bundle export at the end of fit, the frozen-backbone warm-up, checkpoint loading."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BaseFinetuning, Callback
from typing_extensions import override

from deepfeat.finetune.errors import DataError, ModelError
from deepfeat.finetune.models.bundle import export_bundle
from deepfeat.finetune.training.datamodule import RetrievalDataModule
from deepfeat.finetune.training.module import MetricLearningModule
from deepfeat.finetune.training.whiten import DEFAULT_REGS, whiten_model

log = logging.getLogger(__name__)


def load_module_weights(module: MetricLearningModule, ckpt_path: str | Path) -> None:
    """Load the model and loss weights of a Lightning checkpoint into ``module`` (``weights_only=True``)."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise ModelError(f"checkpoint {str(path)!r} not found; pass the .ckpt written by 'deepfeat fit' "
                         f"(see the run's checkpoints/ folder)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"cannot load {str(path)!r} safely ({type(exc).__name__}); deepfeat loads checkpoints "
                         f"with weights_only=True and refuses pickled objects") from exc
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ModelError(f"{str(path)!r} holds no state dict")
    own = module.state_dict()
    bad = [k for k in own if k not in state or tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ModelError(f"checkpoint {str(path)!r} does not fit this model ({len(bad)} missing or reshaped "
                         f"tensors, e.g. {bad[:3]}); it comes from another architecture or config")
    module.load_state_dict({k: state[k] for k in own})


class ExportBundle(Callback):
    """At the end of fit, export the best checkpoint (or the final weights) as a model bundle.

    The same two post-training steps as ``FinetuneSettings`` (``deepfeat recipe run`` reads them from
    this callback's arguments, so both paths export alike):

    Args:
        dirpath: where the bundle directory is written.
        name: bundle name (defaults to the directory name).
        use_best: load the best checkpoint of the ModelCheckpoint callback before exporting.
        onnx: also export ONNX.
        flip_tta: the exported model averages each image's embedding with its mirror's
            (``EmbeddingModel.set_flip_tta``; twice the inference cost).
        whiten: fit a learned whitening on the data module's training images and keep it when it
            beats the plain embeddings on the validation split (:func:`deepfeat.finetune.training.whiten.whiten_model`);
            needs a :class:`RetrievalDataModule` with a ``val`` split.
        whiten_regs: the shrinkages tried.
        whiten_per_class: training images per class embedded for the fit (``None``: all).
        exclude_same_group: the whitening's validation ignores gallery items of the query's own group
            (patient, product), as ``recipe.finetune.exclude_same_group`` does on the guarded path.
    """

    def __init__(self, dirpath: str = "bundle", name: str | None = None, use_best: bool = True,
                 onnx: bool = True, flip_tta: bool = False, whiten: bool = False,
                 whiten_regs: tuple[float, ...] = DEFAULT_REGS, whiten_per_class: int | None = 1000,
                 exclude_same_group: bool = False) -> None:
        self.dirpath = dirpath
        self.name = name
        self.use_best = use_best
        self.onnx = onnx
        self.flip_tta = flip_tta
        self.whiten = whiten
        self.whiten_regs = tuple(whiten_regs)
        self.whiten_per_class = whiten_per_class
        self.exclude_same_group = exclude_same_group
        self.exported: Path | None = None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not isinstance(pl_module, MetricLearningModule):
            return
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        score = getattr(trainer.checkpoint_callback, "best_model_score", None)
        if self.use_best and best:
            load_module_weights(pl_module, best)
            log.info("exporting the best checkpoint %s (score %s)", best, score)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        training: dict[str, Any] = {"epochs": trainer.current_epoch, "global_step": trainer.global_step,
                                    "loss": type(pl_module.loss_fn).__name__,
                                    "hparams": {k: v for k, v in pl_module.hparams.items()},
                                    "best_checkpoint": str(best) if best else None}
        pl_module.model.set_flip_tta(self.flip_tta)
        if self.whiten:
            dm = trainer.datamodule  # type: ignore[attr-defined]
            choice = whiten_model(pl_module.model, dm.split_records("train"), dm.split_records("val"),
                                  regs=self.whiten_regs, per_class=self.whiten_per_class,
                                  batch_size=int(dm.hparams["eval_batch_size"]),
                                  num_workers=int(dm.hparams["num_workers"]), device=pl_module.device,
                                  exclude_same_group=self.exclude_same_group)
            training["whitening"] = choice.summary()
        self.exported = export_bundle(pl_module.model, self.dirpath, name=self.name, training=training,
                                      metrics=metrics, onnx=self.onnx, overwrite=True)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # refused before training, not after it
        dm = getattr(trainer, "datamodule", None)
        if self.whiten and (not isinstance(dm, RetrievalDataModule) or dm.split_records("val").empty):
            raise DataError("ExportBundle(whiten=True) chooses the whitening on a validation split, and this "
                            f"fit has none (data module: {type(dm).__name__}); give the data a val split "
                            "(data.fractions or data.val_fraction) or set whiten: false")


class FreezeBackbone(BaseFinetuning):
    """Train only the head (and loss parameters) for the first ``epochs`` epochs, then the backbone.

    A frozen-backbone warm-up lets a freshly initialised head and loss settle before their gradients
    reach pretrained weights; otherwise the first steps can wreck the pretrained geometry.
    """

    def __init__(self, epochs: int = 1, train_bn: bool = False) -> None:
        super().__init__()
        self.epochs = epochs
        self.train_bn = train_bn

    @override
    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        if self.epochs > 0:
            self.freeze(pl_module.model.backbone, train_bn=self.train_bn)  # type: ignore[union-attr,arg-type]

    @override
    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        if epoch == self.epochs and self.epochs > 0:
            # The backbone's parameter groups already exist (configure_optimizers); unfreezing makes them
            # receive gradients again with their own, lower, learning rate.
            backbone: Any = pl_module.model.backbone  # type: ignore[union-attr]
            self.make_trainable(backbone)
            backbone.freeze_stages(backbone.frozen_stages)  # stages frozen for the whole run stay frozen
            log.info("epoch %d: backbone unfrozen", epoch)
