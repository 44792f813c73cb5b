"""Training logic: a LightningModule around :class:`EmbeddingModel` and a pytorch-metric-learning loss.

Losses and miners are PML objects handed in (YAML ``class_path``/``init_args``), kept as submodules so
a loss with weights (ArcFace, ProxyAnchor) is trained and checkpointed with the model.
"""

from __future__ import annotations

import importlib
import logging
import math
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction, MultiSimilarityLoss
from pytorch_metric_learning.miners import BaseMiner
from torch import nn
from typing_extensions import override

from deepfeat.finetune.errors import ModelError
from deepfeat.finetune.inference.runtime import tune_cpu_allocator
from deepfeat.finetune.metrics import retrieval_metrics_from_records
from deepfeat.finetune.models.model import EmbeddingModel, HeadType, build_embedding_model

log = logging.getLogger(__name__)


class MetricLearningModule(pl.LightningModule):
    """Fine-tunes an embedding model with a metric-learning loss.

    Args:
        backbone: backbone name (see ``create_backbone``).
        weights: ``imagenet`` (installed package), a local state-dict path, or ``none``.
        head: projection head type; ``linear`` starts geometry-preserving.
        embedding_dim: output size (``None`` keeps the backbone's).
        image_size: network input size (``None`` keeps the backbone's default).
        layers: intermediate layers to pool and concatenate instead of the final features.
        loss: a pytorch-metric-learning loss (default: MultiSimilarityLoss).
        miner: an optional pytorch-metric-learning miner.
        lr: learning rate of the backbone (kept low so pretrained features are not destroyed).
        head_lr: learning rate of the head (default 10 x lr).
        loss_lr: learning rate of loss parameters such as ArcFace class centres (default 100 x lr).
        weight_decay: AdamW weight decay (not applied to norms and biases).
        warmup_steps: linear learning-rate warm-up steps, then cosine decay to ``min_lr_ratio``.
        min_lr_ratio: final learning rate as a fraction of the peak.
        l2sp: weight of the L2-SP penalty pulling backbone weights towards their pretrained values
            (Li et al., "Explicit inductive bias for transfer learning", ICML 2018); 0 disables it.
        freeze_bn: keep BatchNorm statistics of the backbone fixed (small PK batches are biased).
        gather_across_ranks: under DDP, compute the loss on embeddings gathered from all ranks.
        distill: weight of a relational distillation term that keeps the batch's similarity matrix
            close to the one of the frozen pretrained features (Park et al., "Relational Knowledge
            Distillation", CVPR 2019): it fights the collapse onto the training classes that hurts
            retrieval of unseen classes; 0 disables it (and the teacher's extra forward pass).
        max_minutes: a wall-clock training budget, counted from the first training batch: training stops when
            it is spent, and the cosine schedule follows whichever of steps or time runs out first, so a
            time-limited run still ends at a low learning rate.
        frozen_stages: keep the first stages of the backbone (the stem counts as one; see
            ``Backbone.freeze_stages``) at their pretrained values for the whole run: fewer steps to learn,
            and a cheaper backward pass, so more steps in a time budget.
        channels_last: keep weights and batches in channels-last (NHWC) memory layout. On CPU the
            oneDNN kernels of depthwise convolutions are several times faster in it (EfficientNet-Lite0
            at 32 px: about 190 -> 570 training images/s on 2 cores); on a GPU it suits the tensor cores.
        drop_path_rate: stochastic depth of the backbone's residual blocks while training (timm
            backbones; see ``create_backbone``); 0 disables it.
        progressive_size: progressive resizing (as in fast.ai's training recipes and EfficientNetV2's
            progressive learning): for the first ``progressive_fraction`` of the run (of its steps, or of
            ``max_minutes`` when that ends it first) training batches are resized to this height (the
            width in proportion) before the forward pass, then the full input size is used. A smaller
            image costs less per step, so a time budget buys more steps, and the last part of the run
            adapts the model (BatchNorm statistics included) to the size it is evaluated and served at.
            ``None`` disables it. Validation, test and export always use the full input size.
        progressive_fraction: the share of the run at ``progressive_size``, in (0, 1).
        optimizer: LightningCLI's ``--optimizer`` (linked here by ``DeepfeatCLI``): ``{"class_path": ...,
            "init_args": {...}}`` of any ``torch.optim.Optimizer``, used instead of AdamW. It gets the same
            parameter groups: its ``lr`` is the backbone's, the head and the loss keep their ratio to ``lr``
            (``head_lr / lr``, ``loss_lr / lr``), and its ``weight_decay`` (when it takes one) replaces
            ``weight_decay`` (norms and biases still get none). ``None``: AdamW with ``lr`` and ``weight_decay``.
        lr_scheduler: LightningCLI's ``--lr_scheduler``: ``{"class_path": ..., "init_args": {...}}`` of any
            torch LR scheduler, stepped once an epoch (``ReduceLROnPlateau`` on its ``monitor``, default
            ``val/map_at_r``). ``None`` (the default): linear warm-up, then the cosine that ends with the step
            count or ``max_minutes``, whichever comes first, stepped every batch.
    """

    def __init__(self, backbone: str = "tf_efficientnet_lite0", weights: str = "imagenet",
                 head: HeadType = "linear", embedding_dim: int | None = None, image_size: int | None = None,
                 layers: list[int | str] | None = None, loss: BaseMetricLossFunction | None = None,
                 miner: BaseMiner | None = None, lr: float = 1e-4, head_lr: float | None = None,
                 loss_lr: float | None = None, weight_decay: float = 1e-4, warmup_steps: int = 0,
                 min_lr_ratio: float = 0.01, l2sp: float = 0.0, freeze_bn: bool = True,
                 gather_across_ranks: bool = True, distill: float = 0.0, max_minutes: float | None = None,
                 channels_last: bool = True, frozen_stages: int = 0, drop_path_rate: float = 0.0,
                 progressive_size: int | None = None, progressive_fraction: float = 0.5,
                 optimizer: dict[str, Any] | None = None, lr_scheduler: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["loss", "miner"])
        self.model: EmbeddingModel = build_embedding_model(backbone, weights, head=head,
                                                           embedding_dim=embedding_dim, layers=layers,
                                                           image_size=image_size,
                                                           drop_path_rate=drop_path_rate)
        self.loss_fn: BaseMetricLossFunction = loss if loss is not None else MultiSimilarityLoss()
        self.miner = miner
        self._check_loss_dims()
        self._small_size = self._check_progressive(progressive_size, progressive_fraction)
        self._started: float | None = None
        self._elapsed = 0.0  # seconds of the budget used, as of the last training batch (the same on every rank)
        self._ddp_tracked: set[int] | None = None  # ids of the parameters DDP synchronises (None: one process)
        if frozen_stages:
            self.model.backbone.freeze_stages(frozen_stages)
            # Lightning warns about modules in eval mode at the start of fit: these are the frozen stages'
            # norms, on purpose
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        self._pretrained: dict[str, torch.Tensor] = {}
        if l2sp > 0:
            self._pretrained = {n: p.detach().clone() for n, p in self.model.backbone.named_parameters()}
        self._eval_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        # The teacher is kept out of the module's parameters and state dict (not trained, not saved).
        self._teacher: list[nn.Module] = []
        if distill > 0:
            import copy

            teacher = copy.deepcopy(self.model.backbone).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            self._teacher.append(teacher)
        if channels_last:
            # before any callback copies the model (EMA), so the copies share the layout
            self.model.to(memory_format=torch.channels_last)
            for teacher in self._teacher:
                teacher.to(memory_format=torch.channels_last)

    def _layout(self, images: torch.Tensor) -> torch.Tensor:
        """A batch in the model's memory layout (a no-op when it already is)."""
        if self.hparams.get("channels_last", False) and images.ndim == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def _check_loss_dims(self) -> None:
        size = getattr(self.loss_fn, "embedding_size", None)
        shape = _class_weight_shape(self.loss_fn)
        if shape is not None:
            size = shape[1]
        if size is not None and int(size) not in (0, self.model.embedding_dim):
            raise ModelError(f"the loss {type(self.loss_fn).__name__} was built for embedding_size={size}, but "
                             f"the model outputs {self.model.embedding_dim} dims; set the loss's init_args."
                             f"embedding_size to {self.model.embedding_dim} (or 0 to take it from the model)")

    def fit_to_classes(self, n_classes: int) -> None:
        """Size a classification loss (ArcFace, ProxyAnchor, ...) to the training split's classes (see
        :func:`fit_class_loss`); the data module calls it at setup, before any callback copies the module."""
        fit_class_loss(self.loss_fn, n_classes, self.model.embedding_dim)

    def _check_progressive(self, size: int | None, fraction: float) -> tuple[int, int] | None:
        """The (height, width) of the progressive-resizing phase, after checking the settings."""
        if size is None:
            return None
        height, width = self.model.preprocessing.input_size
        if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size < height:
            raise ModelError(f"progressive_size must be an int from 16 up to (not including) the input height "
                             f"{height}, got {size!r}; use None to train at the full size throughout")
        if not 0.0 < fraction < 1.0:
            raise ModelError(f"progressive_fraction is the share of the run at progressive_size, in (0, 1); got "
                             f"{fraction!r}")
        return size, max(1, round(width * size / height))

    def _elapsed_share(self) -> float:
        """The share of ``max_minutes`` used, as of the last training batch (0 without a budget)."""
        budget = self.hparams.get("max_minutes")
        if not budget:
            return 0.0
        return min(1.0, self._elapsed / (float(budget) * 60))

    def training_progress(self) -> float:
        """The share of the run done, in [0, 1]: of its steps, or of ``max_minutes`` if that ends it first."""
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return max(min(1.0, self.global_step / total), self._elapsed_share())

    def _train_size(self, images: torch.Tensor) -> torch.Tensor:
        """Training images resized for progressive resizing while its phase lasts; otherwise as they are."""
        if self._small_size is None or self.training_progress() >= float(self.hparams["progressive_fraction"]):
            return images
        if tuple(images.shape[-2:]) == self._small_size:
            return images
        return torch.nn.functional.interpolate(images, size=self._small_size, mode="bilinear", antialias=True,
                                               align_corners=False)

    @property
    def preprocessing(self) -> Any:
        """The model's preprocessing (the data module builds its transforms from it)."""
        return self.model.preprocessing

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self._layout(x))

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.trainer.world_size > 1:
            self._freeze_unreachable()

    def _freeze_unreachable(self) -> None:
        """Freeze the parameters no forward pass reaches (under DDP, before it wraps the module).

        DDP waits for a gradient of every parameter it tracks and fails on the second step when one never gets
        any: the backbone blocks after the last of ``layers``, a timm classifier left in the model. They cannot
        train anyway; frozen, DDP does not track them (a single process skips them alike: they have no gradient).
        """
        params = dict(self.model.named_parameters())
        flags = {name: p.requires_grad for name, p in params.items()}
        was_training = self.model.training
        self.model.eval()  # a probe batch must not move BatchNorm statistics; reachability does not depend on it
        try:
            for p in params.values():
                p.requires_grad_(True)
            h, w = self.model.preprocessing.input_size
            device = next(iter(params.values())).device
            out = self.model(self._layout(torch.zeros(1, 3, h, w, device=device)))
            grads = torch.autograd.grad(out.sum(), list(params.values()), allow_unused=True)
        finally:
            for name, p in params.items():
                p.requires_grad_(flags[name])
            self.model.train(was_training)
        unreachable = [name for name, g in zip(params, grads, strict=True) if g is None]
        for name in unreachable:
            params[name].requires_grad_(False)
        if unreachable:
            log.info("DDP: %d parameters no forward pass reaches are frozen (e.g. %s)", len(unreachable),
                     unreachable[:3])

    @override
    def on_fit_start(self) -> None:
        tune_cpu_allocator()
        # DDP has just wrapped the module: it all-reduces the gradients of the parameters that required them then.
        # A parameter frozen at that moment (FreezeBackbone, frozen stages) and trained later is synchronised here.
        world = self.trainer.world_size
        self._ddp_tracked = {id(p) for p in self.parameters() if p.requires_grad} if world > 1 else None

    @override
    def on_after_backward(self) -> None:
        if self._ddp_tracked is None:
            return
        # every rank unfreezes at the same epoch and runs the same graph: the list is the same on every rank
        late = [p for p in self.parameters()
                if p.requires_grad and p.grad is not None and id(p) not in self._ddp_tracked]
        if not late:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in late])  # type: ignore[union-attr]
        torch.distributed.all_reduce(flat)
        flat /= self.trainer.world_size
        offset = 0
        for p in late:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p))  # type: ignore[union-attr]
            offset += n

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # ``max_minutes`` ends the run as well as shaping the schedule: the time budget counts from the first
        # training batch (not data loading or the baseline's evaluation)
        if not self.hparams.get("max_minutes"):
            return
        if self._started is None:
            self._started = time.perf_counter()
        elapsed = time.perf_counter() - self._started
        if self.trainer.world_size > 1:
            # Under DDP every rank must take the same decision at the same step (a rank that stops alone leaves the
            # others waiting in a collective) and step the same LR schedule (the ranks' weights must stay equal):
            # all use the slowest rank's clock.
            clock = torch.tensor(elapsed, dtype=torch.float64, device=self.device)
            elapsed = float(self.trainer.strategy.reduce(clock, reduce_op="max"))
        self._elapsed = elapsed
        if self._elapsed_share() >= 1.0:
            self.trainer.should_stop = True

    @override
    def on_train_epoch_start(self) -> None:
        if self.hparams["freeze_bn"]:
            for m in self.model.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        images, labels = batch["image"], batch["label"]
        if images is None or len(labels) < 2:
            return None  # every image of the batch failed to decode (already reported)
        images = self._layout(self._train_size(images))
        emb = self.model(images)
        if self.hparams["gather_across_ranks"] and self.trainer.world_size > 1:
            emb = self.all_gather(emb, sync_grads=True).flatten(0, 1)  # type: ignore[union-attr]
            labels = self.all_gather(labels).flatten(0, 1)  # type: ignore[union-attr]
        tuples = self.miner(emb, labels) if self.miner is not None else None
        loss = self.loss_fn(emb, labels, tuples)
        if self._teacher:
            teacher = self._teacher[0].to(images.device)
            with torch.no_grad():
                t = torch.nn.functional.normalize(teacher(images), dim=1)
            s = torch.nn.functional.normalize(emb[: len(t)], dim=1)
            rkd = torch.nn.functional.mse_loss(s @ s.T, t @ t.T)
            self.log("train/distill", rkd, batch_size=len(labels))
            loss = loss + self.hparams["distill"] * rkd
        if self._pretrained:
            reg = sum(((p - self._pretrained[n].to(p.device)) ** 2).sum()
                      for n, p in self.model.backbone.named_parameters() if p.requires_grad)
            loss = loss + self.hparams["l2sp"] * reg
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        return loss  # type: ignore[no-any-return]

    def _eval_step(self, batch: dict[str, Any]) -> None:
        if batch["image"] is None:
            return
        emb = self.model(self._layout(batch["image"]))
        self._eval_outputs.append((emb.float().cpu(), batch["index"].cpu()))

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    @override
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_retrieval("val")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_retrieval("test")

    def _log_retrieval(self, stage: str) -> None:

        outputs, self._eval_outputs = self._eval_outputs, []
        if not outputs or self.trainer.sanity_checking:
            return
        emb = torch.cat([o[0] for o in outputs])
        idx = torch.cat([o[1] for o in outputs])
        if self.trainer.world_size > 1:
            emb, idx = _gather_shares(emb, idx)
        order = np.argsort(idx.numpy(), kind="stable")
        idx_np, emb_np = idx.numpy()[order], emb.numpy()[order]
        _, first = np.unique(idx_np, return_index=True)  # DDP pads with repeated samples
        dm = self.trainer.datamodule  # type: ignore[attr-defined]
        records = dm.eval_records(stage).iloc[idx_np[first]]
        metrics = retrieval_metrics_from_records(emb_np[first], records)
        for key, value in metrics.items():
            if isinstance(value, float | int) and not key.startswith("n_"):
                self.log(f"{stage}/{key}", float(value), sync_dist=False, prog_bar=key in ("map_at_r", "recall_at_1"))

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        if batch["image"] is None:
            return {"embeddings": torch.zeros(0, self.model.embedding_dim), "index": batch["index"],
                    "errors": batch["errors"]}
        return {"embeddings": self.model(self._layout(batch["image"])).float().cpu(), "index": batch["index"].cpu(),
                "errors": batch["errors"]}

    @override
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        chosen = _class_config(hp.get("optimizer"), "optimizer")
        options = dict(chosen.get("init_args") or {}) if chosen else {}
        # an --optimizer's lr is the backbone's; the head and the loss keep their ratio to model.lr
        scale = float(options["lr"]) / float(hp["lr"]) if "lr" in options else 1.0
        lr = float(hp["lr"]) * scale
        head_lr = float(hp["head_lr"] or float(hp["lr"]) * 10) * scale
        loss_lr = float(hp["loss_lr"] or float(hp["lr"]) * 100) * scale
        weight_decay = float(options.get("weight_decay", hp["weight_decay"]) or 0.0)

        def split_decay(params: list[tuple[str, nn.Parameter]], group_lr: float) -> list[dict[str, Any]]:
            decay = [p for n, p in params if p.ndim > 1]
            no_decay = [p for n, p in params if p.ndim <= 1]
            return [g for g in ({"params": decay, "lr": group_lr, "weight_decay": weight_decay},
                                {"params": no_decay, "lr": group_lr, "weight_decay": 0.0}) if g["params"]]

        groups = (split_decay(list(self.model.backbone.named_parameters()), lr)
                  + split_decay(list(self.model.head.named_parameters()), head_lr)
                  + split_decay(list(self.loss_fn.named_parameters()), loss_lr))
        if chosen:
            if "weight_decay" not in options:  # an optimizer without weight decay: the groups may not carry it
                for g in groups:
                    g.pop("weight_decay")
            optimizer: torch.optim.Optimizer = _instantiate(chosen, groups, "optimizer")
        else:
            # the fused kernel updates every tensor in one pass: 8.6 -> 2.4 ms per step for Lite0 on 2 CPU cores
            fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point
                        for g in groups for p in g["params"])
            optimizer = torch.optim.AdamW(groups, fused=fused or None)
        scheduler_config = _class_config(hp.get("lr_scheduler"), "lr_scheduler")
        if scheduler_config:
            scheduler = _instantiate(scheduler_config, optimizer, "lr_scheduler")
            entry: dict[str, Any] = {"scheduler": scheduler, "interval": "epoch"}
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                entry["monitor"] = getattr(scheduler, "monitor", None) or "val/map_at_r"
            return {"optimizer": optimizer, "lr_scheduler": entry}
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(hp["warmup_steps"])
        floor = float(hp["min_lr_ratio"])

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = max(min(1.0, (step - warmup) / max(1, total - warmup)), self._elapsed_share())
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        cosine = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


def _class_config(value: Any, key: str) -> dict[str, Any] | None:
    """``{"class_path": ..., "init_args": {...}}`` from a LightningCLI section (a dict or a Namespace), or None.

    Raises:
        ModelError: the value names no class.
    """
    if value is None:
        return None
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, str):
        value = {"class_path": value}
    if not isinstance(value, dict) or not isinstance(value.get("class_path"), str):
        raise ModelError(f"{key} must name a class, as --{key} torch.optim.SGD or {{'class_path': "
                         f"'torch.optim.SGD', 'init_args': {{'lr': 0.01}}}} (got {value!r})")
    return {"class_path": value["class_path"], "init_args": dict(value.get("init_args") or {})}


def _instantiate(config: dict[str, Any], first: Any, key: str) -> Any:
    """``class_path(first, **init_args)``, a refusal in one line when the class cannot be built."""
    module_name, _, name = config["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
        return cls(first, **config["init_args"])
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        raise ModelError(f"cannot build the {key} {config['class_path']!r} with {config['init_args']}: "
                         f"{' '.join(str(exc).split())}; check its class path and arguments") from exc


def _gather_shares(emb: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (embeddings, indices) of an evaluation split, concatenated in rank order.

    Gathered as objects, not tensors: the shares may differ in length (an image that failed to decode on one
    rank), which a tensor all-gather cannot take.
    """
    shares: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shares, (emb, idx))
    return torch.cat([s[0] for s in shares]), torch.cat([s[1] for s in shares])


def _class_weight_shape(loss: nn.Module) -> tuple[int, int] | None:
    """(classes, embedding size) of a classification loss's weights (ArcFace ``W``, ProxyAnchor ``proxies``)."""
    w = getattr(loss, "W", None)
    if isinstance(w, torch.Tensor) and w.ndim == 2:
        per_class = int(getattr(loss, "sub_centers", 1) or 1)  # SubCenterArcFace keeps several centres a class
        return int(w.shape[1]) // per_class, int(w.shape[0])
    proxies = getattr(loss, "proxies", None)
    if isinstance(proxies, torch.Tensor) and proxies.ndim == 2:
        return int(proxies.shape[0]), int(proxies.shape[1])
    return None


def fit_class_loss(loss: nn.Module, n_classes: int, embedding_dim: int) -> None:
    """Give a classification loss (ArcFace, CosFace, ProxyAnchor, ...) the data's class count and the model's size.

    A YAML may write ``num_classes: 0`` and ``embedding_size: 0`` to take them from the training split and the
    model; the weights are then created here, before the optimizer sees them. A value that disagrees with the data
    is refused in one line (otherwise a label past ``num_classes`` fails deep inside the loss).

    Raises:
        ModelError: ``num_classes`` or ``embedding_size`` is set and wrong.
    """
    shape = _class_weight_shape(loss)
    if shape is None:
        return
    classes, size = shape
    name = type(loss).__name__
    if classes not in (0, n_classes):
        raise ModelError(f"the loss {name} was built for num_classes={classes}, but the training split has "
                         f"{n_classes} classes; set model.loss.init_args.num_classes to {n_classes} (or 0 to take it "
                         f"from the data)")
    if classes and size:
        return
    rows_are_classes = not isinstance(getattr(loss, "W", None), torch.Tensor)
    per_class = int(getattr(loss, "sub_centers", 1) or 1)
    weights = torch.empty((n_classes, embedding_dim) if rows_are_classes else (embedding_dim, n_classes * per_class))
    init = getattr(loss, "weight_init_func", None)
    if callable(init):
        init(weights)
    else:
        nn.init.kaiming_normal_(weights, mode="fan_out")
    setattr(loss, "proxies" if rows_are_classes else "W", nn.Parameter(weights))
    for attr, value in (("num_classes", n_classes), ("embedding_size", embedding_dim)):
        if hasattr(loss, attr):
            setattr(loss, attr, value)
    log.info("%s: num_classes=%d and embedding_size=%d taken from the data and the model", name, n_classes,
             embedding_dim)

