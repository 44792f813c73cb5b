"""Training callbacks: the bundle export at the end of fit, the frozen-backbone warm-up, checkpoint loading."""

from __future__ import annotations

import copy
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BaseFinetuning, Callback, WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn
from typing_extensions import override

from deepfeat.finetune.errors import DataError, ModelError
from deepfeat.finetune.inference.evaluate import evaluate_models, off_the_shelf
from deepfeat.finetune.metrics import format_metrics_table
from deepfeat.finetune.models.bundle import export_bundle
from deepfeat.finetune.models.model import EmbeddingModel
from deepfeat.finetune.training.datamodule import RetrievalDataModule, check_measurable
from deepfeat.finetune.training.module import MetricLearningModule
from deepfeat.finetune.training.whiten import DEFAULT_REGS, whiten_model

log = logging.getLogger(__name__)

#: The validation metric that chooses the checkpoint and that the guard compares.
SELECT_KEY = "map_at_r"
#: How to give the data a held-out test split (said in one line when there is none).
NO_TEST_FIX = ("add one with data.split_mode by_group or by_class and a third data.fractions share > 0, or 'test' "
               "rows in a manifest's 'split' column")


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


@dataclass
class FinetuneResult:
    """What a guarded fit produced: the model kept, why, and its figures on validation and on the test split."""

    model: EmbeddingModel
    chosen: Literal["fine-tuned", "off-the-shelf"]
    val: dict[str, dict[str, Any]]
    seconds: float
    epochs: int
    steps: int
    best_checkpoint: str | None
    bundle: Path | None = None
    message: str = ""
    whitening: dict[str, Any] | None = None
    test: dict[str, dict[str, Any]] | None = None
    test_message: str = ""
    test_exported: str | None = None

    def test_table(self) -> str | None:
        """The before/after table on the held-out test split (``None`` when the data has none).

        Rows: ``off-the-shelf`` (the same backbone's pretrained features, as exported: same layers, flip TTA),
        ``fine-tuned`` and, when the guard kept the off-the-shelf model with a learned whitening, that model as
        exported; :attr:`test_exported` names the row of the exported bundle.
        """
        if not self.test:
            return None
        return format_metrics_table(self.test, delta=len(self.test) > 1)


class EMA(WeightAveraging):
    """An exponential moving average of the weights after every optimizer step (the exported model is the average).

    The multi-tensor form of :func:`torch.optim.swa_utils.get_ema_multi_avg_fn`: about 3x cheaper per step than
    Lightning's ``EMAWeightAveraging`` per-tensor update (14 -> 5 ms for Lite0 on 2 CPU cores).

    Args:
        decay: the weight of the running average at each step (0.99: about the last 100 steps).
    """

    def __init__(self, decay: float = 0.99) -> None:
        if not 0.0 < decay < 1.0:
            raise ModelError(f"EMA decay must be in (0, 1), got {decay!r}; 0.99 averages about the last 100 steps")
        super().__init__(multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.decay = decay


class ExportBundle(Callback):
    """The guarded end of every fit: keep the better of fine-tuned and off-the-shelf, measure it, export a bundle.

    At the end of fit (rank 0 only) the best checkpoint is loaded, the fine-tuned model and the off-the-shelf
    features of the same backbone are compared on the validation split, and the off-the-shelf model is kept
    when fine-tuning does not beat it (better MAP@R without giving up Recall@1). An optional learned whitening is
    chosen on validation. Then both models are measured on the held-out **test** split, which took no part in
    training or model selection, and the bundle is exported with those figures in its card. ``deepfeat fit``,
    ``deepfeat recipe run`` and the quickstart all end here (:attr:`result`).

    Before training, validation and test splits that cannot measure retrieval (one class, or no query with a
    positive in the gallery) are refused.

    Args:
        dirpath: where the bundle directory is written.
        name: bundle name (defaults to the directory name).
        use_best: load the best checkpoint of the ModelCheckpoint callback before exporting.
        onnx: also export ONNX.
        guard: keep the off-the-shelf model when fine-tuning does not beat it on validation.
        flip_tta: the exported model averages each image's embedding with its mirror's
            (``EmbeddingModel.set_flip_tta``; twice the inference cost).
        whiten: fit a learned whitening on the training images and keep it when it beats the plain embeddings on
            the validation split (:func:`deepfeat.finetune.training.whiten.whiten_model`).
        whiten_regs: the shrinkages tried.
        whiten_per_class: training images per class embedded for the fit (``None``: all).
        exclude_same_group: validation and test ignore gallery items of the query's own group (patient, product).
        test: measure both models on the data's test split at the end.
    """

    def __init__(self, dirpath: str = "bundle", name: str | None = None, use_best: bool = True,
                 onnx: bool = True, guard: bool = True, flip_tta: bool = False, whiten: bool = False,
                 whiten_regs: tuple[float, ...] = DEFAULT_REGS, whiten_per_class: int | None = 1000,
                 exclude_same_group: bool = False, test: bool = True) -> None:
        self.dirpath = dirpath
        self.name = name
        self.use_best = use_best
        self.onnx = onnx
        self.guard = guard
        self.flip_tta = flip_tta
        self.whiten = whiten
        self.whiten_regs = tuple(whiten_regs)
        self.whiten_per_class = whiten_per_class
        self.exclude_same_group = exclude_same_group
        self.test = test
        self.exported: Path | None = None
        self.result: FinetuneResult | None = None
        self._start = 0.0

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # refused before training, not after it
        self._start = time.perf_counter()
        dm = getattr(trainer, "datamodule", None)
        if not isinstance(dm, RetrievalDataModule):
            raise DataError(f"ExportBundle needs a RetrievalDataModule (its val split chooses the model); this fit "
                            f"has {type(dm).__name__}")
        if dm.split_records("val").empty:
            raise DataError("fine-tuning needs a 'val' split for model selection and the baseline guard; the data has "
                            f"splits {sorted(set(dm.records['split']))}: set data.val_fraction > 0 or use "
                            "data.split_mode by_class / by_group")
        check_measurable(dm.records, "val", exclude_same_group=self.exclude_same_group)
        if self.test and not dm.split_records("test").empty:
            check_measurable(dm.records, "test", exclude_same_group=self.exclude_same_group)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not isinstance(pl_module, MetricLearningModule):
            return
        dm = trainer.datamodule  # type: ignore[attr-defined]
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
        if self.use_best and best:
            load_module_weights(pl_module, best)
            score = getattr(trainer.checkpoint_callback, "best_model_score", None)
            monitor = getattr(trainer.checkpoint_callback, "monitor", None) or "score"
            log.info("exporting the best checkpoint %s (%s %s)", best, monitor,
                     "unknown" if score is None else f"{float(score):.4f}")
        device = pl_module.device
        batch, workers = int(dm.hparams["eval_batch_size"]), int(dm.hparams["num_workers"])
        measure = functools.partial(evaluate_models, batch_size=batch, num_workers=workers,
                                    exclude_same_group=self.exclude_same_group, device=device)
        model = pl_module.model
        model.set_flip_tta(self.flip_tta)  # after fit: validation epochs ran at the single-view cost
        base = off_the_shelf(model, str(pl_module.hparams.get("weights", "imagenet")))
        base.set_flip_tta(self.flip_tta)  # the guard compares like with like
        val_records = dm.split_records("val")
        val = measure({"off-the-shelf": base, "fine-tuned": model}, val_records)
        chosen, message = self._choose(val)
        kept = model if chosen == "fine-tuned" else base
        # the test table's baseline stays the plain pretrained features even when the kept baseline is whitened
        plain_base = copy.deepcopy(base) if self.whiten and chosen == "off-the-shelf" else base
        whitening: dict[str, Any] | None = None
        if self.whiten:
            choice = whiten_model(kept, dm.split_records("train"), val_records, regs=self.whiten_regs,
                                  per_class=self.whiten_per_class, batch_size=batch, num_workers=workers,
                                  device=device, exclude_same_group=self.exclude_same_group)
            whitening = choice.summary()
            if choice.reg is None:
                message += "; no whitening (none beat the plain embeddings on validation)"
            else:
                val[f"{chosen} + whitening"] = choice.val
                message += (f"; learned whitening (reg {choice.reg:g}) kept: validation MAP@R "
                            f"{choice.val[SELECT_KEY]:.4f}, Recall@1 {choice.val['recall_at_1']:.4f}")
        test, test_message, test_exported = self._measure_test(dm, measure, plain_base, model, kept, chosen)
        if test:
            log.info("held-out test split, before/after:\n%s", format_metrics_table(test, delta=len(test) > 1))
        log.info(test_message)
        kept.cpu()
        base.cpu()
        seconds = time.perf_counter() - self._start
        self.result = FinetuneResult(model=kept, chosen=chosen, val=val, seconds=seconds,
                                     epochs=trainer.current_epoch, steps=trainer.global_step, best_checkpoint=best,
                                     message=message, whitening=whitening, test=test, test_message=test_message,
                                     test_exported=test_exported)
        training: dict[str, Any] = {
            "chosen": chosen, "guard": message, "epochs": trainer.current_epoch, "steps": trainer.global_step,
            "seconds": round(seconds, 1), "loss": type(pl_module.loss_fn).__name__,
            "miner": type(pl_module.miner).__name__ if pl_module.miner is not None else None,
            "hparams": dict(pl_module.hparams), "best_checkpoint": best, "whitening": whitening,
            "n_train": len(dm.split_records("train")),
            "n_classes_train": int(dm.split_records("train")["label"].nunique()), "test": test_message,
            # what 'deepfeat evaluate' compares its data with (a warning when a bundle is scored on other data)
            "data_source": str(dm.source), "classes_train": sorted(dm.split_records("train")["label"].astype(str)
                                                                    .unique().tolist())[:1000],
            "test_exported": test_exported}
        metrics = {f"{split}/{name}/{k}": float(v) for split, table in (("val", val), ("test", test or {}))
                   for name, m in table.items() for k, v in m.items() if isinstance(v, float | int)}
        self.exported = export_bundle(kept, self.dirpath, name=self.name, training=training, metrics=metrics,
                                      onnx=self.onnx, overwrite=True)
        self.result.bundle = self.exported
        torch.set_grad_enabled(True)

    def _choose(self, val: dict[str, dict[str, Any]]) -> tuple[Literal["fine-tuned", "off-the-shelf"], str]:
        b, a = val["off-the-shelf"], val["fine-tuned"]
        summary = (f"validation MAP@R {a[SELECT_KEY]:.4f} vs off-the-shelf {b[SELECT_KEY]:.4f}, Recall@1 "
                   f"{a['recall_at_1']:.4f} vs {b['recall_at_1']:.4f}")
        # "Beats" means better MAP@R without giving up Recall@1: a user must never get a model that finds the
        # right first hit less often than what they already had.
        if self.guard and not (a[SELECT_KEY] > b[SELECT_KEY] and a["recall_at_1"] >= b["recall_at_1"]):
            message = (f"fine-tuning did not beat the off-the-shelf features on validation ({summary}); keeping the "
                       "off-the-shelf model. Try more data or epochs, a lower lr, distill > 0 or l2sp > 0")
            log.info(message)
            return "off-the-shelf", message
        message = f"fine-tuned model kept: {summary}"
        log.info(message)
        return "fine-tuned", message

    def _measure_test(self, dm: RetrievalDataModule, measure: Callable[..., dict[str, dict[str, Any]]],
                      base: EmbeddingModel, model: EmbeddingModel, kept: EmbeddingModel, chosen: str
                      ) -> tuple[dict[str, dict[str, Any]] | None, str, str | None]:
        """The before/after on the test split, the one-line summary, and the row of the exported model."""
        if not self.test:
            return None, "no held-out test evaluation (ExportBundle test: false)", None
        test_records = dm.split_records("test")
        if test_records.empty:
            return None, (f"no held-out test split, so no before/after on images that took no part in training or "
                          f"model selection (the figures above are validation's): {NO_TEST_FIX}"), None
        models = {"off-the-shelf": base, "fine-tuned": model}
        exported = chosen
        if kept is not model and kept is not base:  # the baseline kept, with a learned whitening
            exported = "off-the-shelf + whitening"
            models[exported] = kept
        test = measure(models, test_records)
        n_q, n_g = int(test_records["is_query"].sum()), int(test_records["is_gallery"].sum())
        b, a = test["off-the-shelf"], test["fine-tuned"]
        return test, (f"held-out test split ({n_q} queries vs {n_g} gallery images; the {exported} model is "
                      f"exported): Recall@1 {a['recall_at_1']:.4f} fine-tuned vs {b['recall_at_1']:.4f} "
                      f"off-the-shelf, MAP@R {a[SELECT_KEY]:.4f} vs {b[SELECT_KEY]:.4f}"), exported


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
