"""One obvious path through fine-tuning, safe by default.

``finetune`` trains with the defaults that keep a pretrained backbone's geometry (frozen-backbone
warm-up, geometry-preserving head, low backbone learning rate, EMA of the weights, model selection
on the validation split) and then *guards* the result: if the fine-tuned model does not beat the
off-the-shelf features on validation, the off-the-shelf model is kept and the result says so. A
user never gets a model that retrieves worse than what they already had, on the data they can see.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, WeightAveraging
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.miners import BaseMiner
from torch.optim.swa_utils import get_ema_multi_avg_fn

from deepfeat.finetune.errors import DataError
from deepfeat.finetune.inference.evaluate import evaluate_models, off_the_shelf
from deepfeat.finetune.models.bundle import export_bundle
from deepfeat.finetune.models.model import EmbeddingModel, HeadType
from deepfeat.finetune.training.callbacks import FreezeBackbone, load_module_weights
from deepfeat.finetune.training.datamodule import Preset, RetrievalDataModule
from deepfeat.finetune.training.module import MetricLearningModule
from deepfeat.finetune.training.whiten import DEFAULT_REGS, whiten_model

log = logging.getLogger(__name__)

SELECT_KEY = "map_at_r"


def evaluation_device(accelerator: str) -> str:
    """Where validation embeddings are computed: the GPU when training runs on one, else the CPU."""
    return "cuda" if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu"


@dataclass
class FinetuneSettings:
    """Everything ``finetune`` needs; the defaults are the safe ones (see the module docstring)."""

    backbone: str = "tf_efficientnet_lite0"
    weights: str = "imagenet"
    image_size: int | None = 64
    head: HeadType = "linear"
    embedding_dim: int | None = 256
    layers: list[int | str] | None = None
    lr: float = 1e-4
    head_lr: float | None = 1e-3
    loss_lr: float | None = 1e-2
    weight_decay: float = 1e-4
    warmup_steps: int = 30
    l2sp: float = 0.0
    distill: float = 0.0
    freeze_bn: bool = True
    freeze_epochs: int = 1
    frozen_stages: int = 0
    drop_path_rate: float = 0.0
    progressive_size: int | None = None
    progressive_fraction: float = 0.5
    ema_decay: float | None = 0.99
    max_epochs: int = 6
    max_minutes: float | None = None
    batches_per_epoch: int | None = 60
    p: int = 10
    k: int = 6
    preset: Preset = "fashion"
    erasing: float = 0.0
    num_workers: int | Literal["auto"] = "auto"
    eval_batch_size: int = 256
    accelerator: str = "auto"
    precision: str = "32-true"
    channels_last: bool = True
    flip_tta: bool = False
    whiten: bool = False
    whiten_regs: tuple[float, ...] = DEFAULT_REGS
    whiten_per_class: int | None = 1000
    seed: int = 0
    patience: int = 3
    guard: bool = True
    exclude_same_group: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (for model cards)."""
        return asdict(self)


@dataclass
class FinetuneResult:
    """What ``finetune`` produced."""

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


class _StopAfter(Callback):
    """Stop after a wall-clock budget, measured from the first training batch (not data loading)."""

    def __init__(self, minutes: float) -> None:
        self.seconds = minutes * 60
        self.start: float | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.start is None:
            self.start = time.perf_counter()
        elif time.perf_counter() - self.start > self.seconds:
            trainer.should_stop = True


def training_workers(settings: FinetuneSettings, cores: int | None = None) -> int:
    """The settings' DataLoader worker count, ``auto`` resolved for where training runs.

    ``auto`` follows ``embed.auto_num_workers``: on a machine of 2 cores or fewer a worker process takes
    a core from the model's threads, and training without one was measured faster (Fashion-MNIST,
    EfficientNet-Lite0 at 48 px, 2 cores: 2.7 steps/s without workers against 2.3 with two).
    """
    if settings.num_workers != "auto":
        return int(settings.num_workers)
    from deepfeat.finetune.inference.embed import auto_num_workers

    return auto_num_workers(evaluation_device(settings.accelerator), cores)


def make_datamodule(records: pd.DataFrame, settings: FinetuneSettings, **data_kwargs: Any) -> RetrievalDataModule:
    """A data module over ``records`` with the settings' batch shape and preset."""
    kw: dict[str, Any] = {"p": settings.p, "k": settings.k, "batches_per_epoch": settings.batches_per_epoch,
                          "preset": settings.preset, "erasing": settings.erasing,
                          "num_workers": training_workers(settings), "eval_batch_size": settings.eval_batch_size,
                          "seed": settings.seed}
    kw.update(data_kwargs)
    return RetrievalDataModule.from_records(records, **kw)


def finetune(dm: RetrievalDataModule, settings: FinetuneSettings, out_dir: str | Path, *,
             loss: BaseMetricLossFunction | None = None, miner: BaseMiner | None = None,
             bundle_name: str | None = None, progress: bool = False) -> FinetuneResult:
    """Fine-tune on ``dm``'s train split, select on its val split, guard against the baseline, export.

    Args:
        dm: the data (train and val splits needed; see ``RetrievalDataModule``).
        settings: hyper-parameters (safe defaults).
        out_dir: run directory: checkpoints and the exported ``bundle/``.
        loss: a pytorch-metric-learning loss (default MultiSimilarityLoss).
        miner: an optional miner.
        bundle_name: name written into the bundle card.
        progress: show Lightning's progress bar.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(settings.seed, workers=True)
    if not (dm.records["split"] == "val").any():
        raise DataError("fine-tuning needs a 'val' split for model selection and the baseline guard; set "
                        "val_fraction > 0 or use split_mode 'by_class'/'by_group'")
    counts = dm.split_records("train")["label"].value_counts()
    usable = int((counts >= 2).sum())
    if 2 <= usable < dm.hparams["p"]:
        log.info("only %d training classes have 2+ images: batches take p=%d classes instead of %d", usable,
                 usable, dm.hparams["p"])
        dm.hparams["p"] = usable
    module = MetricLearningModule(
        backbone=settings.backbone, weights=settings.weights, head=settings.head,
        embedding_dim=settings.embedding_dim, image_size=settings.image_size, layers=settings.layers,
        loss=loss, miner=miner, lr=settings.lr, head_lr=settings.head_lr, loss_lr=settings.loss_lr,
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_steps, l2sp=settings.l2sp, freeze_bn=settings.freeze_bn,
        distill=settings.distill, max_minutes=settings.max_minutes, channels_last=settings.channels_last,
        frozen_stages=settings.frozen_stages, drop_path_rate=settings.drop_path_rate,
        progressive_size=settings.progressive_size, progressive_fraction=settings.progressive_fraction)
    dm.set_preprocessing(module.preprocessing)
    val_records = dm.split_records("val")
    base = off_the_shelf(module.model, settings.weights)
    base.set_flip_tta(settings.flip_tta)  # the guard compares like with like
    start = time.perf_counter()
    eval_device = evaluation_device(settings.accelerator)
    val = evaluate_models({"off-the-shelf": base}, val_records, batch_size=settings.eval_batch_size,
                          num_workers=training_workers(settings), exclude_same_group=settings.exclude_same_group,
                          device=eval_device)
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", monitor=f"val/{SELECT_KEY}", mode="max", save_top_k=1,
                           filename="best", save_last=False, enable_version_counter=False)
    callbacks: list[Callback] = [ckpt, EarlyStopping(monitor=f"val/{SELECT_KEY}", mode="max",
                                                     patience=settings.patience)]
    if settings.freeze_epochs > 0:
        callbacks.append(FreezeBackbone(epochs=settings.freeze_epochs))
    if settings.ema_decay:
        # an EMA after every optimizer step, in the multi-tensor form: about 3x cheaper per step than
        # EMAWeightAveraging's per-tensor update (14 -> 5 ms for Lite0 on 2 CPU cores)
        callbacks.append(WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay)))
    if settings.max_minutes:
        callbacks.append(_StopAfter(settings.max_minutes))
    trainer = pl.Trainer(max_epochs=settings.max_epochs, accelerator=settings.accelerator, devices=1,
                         precision=settings.precision, logger=False, callbacks=callbacks,  # type: ignore[arg-type]
                         enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
                         use_distributed_sampler=False, log_every_n_steps=10, default_root_dir=str(out))
    trainer.fit(module, datamodule=dm)
    best = ckpt.best_model_path or None
    if best:
        load_module_weights(module, best)
    module.model.set_flip_tta(settings.flip_tta)  # after fit: validation epochs ran at the single-view cost
    module.model.eval()  # evaluate_models moves it to eval_device; it goes back to the CPU after
    val.update(evaluate_models({"fine-tuned": module.model}, val_records, batch_size=settings.eval_batch_size,
                               num_workers=training_workers(settings), exclude_same_group=settings.exclude_same_group,
                               device=eval_device))
    module.model.cpu()
    base.cpu()
    b, a = val["off-the-shelf"], val["fine-tuned"]
    summary = (f"validation MAP@R {a[SELECT_KEY]:.4f} vs off-the-shelf {b[SELECT_KEY]:.4f}, Recall@1 "
               f"{a['recall_at_1']:.4f} vs {b['recall_at_1']:.4f}")
    chosen: Literal["fine-tuned", "off-the-shelf"] = "fine-tuned"
    message = f"fine-tuned model kept: {summary}"
    # "Beats" means better MAP@R without giving up Recall@1: a user must never get a model that finds
    # the right first hit less often than what they already had.
    if settings.guard and not (a[SELECT_KEY] > b[SELECT_KEY] and a["recall_at_1"] >= b["recall_at_1"]):
        chosen = "off-the-shelf"
        message = (f"fine-tuning did not beat the off-the-shelf features on validation ({summary}); keeping "
                   f"the off-the-shelf model. Try more data or epochs, a lower lr, distill > 0 or l2sp > 0")
        log.warning(message)
    else:
        log.info(message)
    model = module.model if chosen == "fine-tuned" else base
    whitening: dict[str, Any] | None = None
    if settings.whiten:
        choice = whiten_model(model, dm.split_records("train"), val_records, regs=settings.whiten_regs,
                              per_class=settings.whiten_per_class, seed=settings.seed,
                              batch_size=settings.eval_batch_size, num_workers=training_workers(settings),
                              exclude_same_group=settings.exclude_same_group, device=eval_device)
        model.cpu()
        whitening = choice.summary()
        if choice.reg is None:
            message += "; no whitening (none beat the plain embeddings on validation)"
        else:
            val[f"{chosen} + whitening"] = choice.val
            message += (f"; learned whitening (reg {choice.reg:g}) kept: validation MAP@R "
                        f"{choice.val[SELECT_KEY]:.4f}, Recall@1 {choice.val['recall_at_1']:.4f}")
    seconds = time.perf_counter() - start
    result = FinetuneResult(model=model, chosen=chosen, val=val, seconds=seconds, epochs=trainer.current_epoch,
                            steps=trainer.global_step, best_checkpoint=best, message=message, whitening=whitening)
    training = {"settings": settings.to_dict(), "loss": type(module.loss_fn).__name__,
                "miner": type(miner).__name__ if miner is not None else None, "chosen": chosen,
                "epochs": result.epochs, "steps": result.steps, "seconds": round(seconds, 1),
                "n_train": int((dm.records["split"] == "train").sum()),
                "n_classes_train": int(dm.split_records("train")["label"].nunique()),
                "guard": message, "whitening": whitening}
    metrics = {f"val/{name}/{k}": float(v) for name, m in val.items() for k, v in m.items()
               if isinstance(v, float | int)}
    result.bundle = export_bundle(model, out / "bundle", name=bundle_name or out.name, training=training,
                                  metrics=metrics, overwrite=True)
    torch.set_grad_enabled(True)
    return result
