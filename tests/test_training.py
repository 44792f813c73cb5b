"""Real Lightning training on tiny real images: every supported loss lowers its loss; CLI fit/export."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from pytorch_metric_learning import losses, miners

from deepfeat.finetune.data.readers import read_image_folder
from deepfeat.finetune.errors import ModelError
from deepfeat.finetune.training.callbacks import FreezeBackbone
from deepfeat.finetune.training.datamodule import RetrievalDataModule
from deepfeat.finetune.training.module import MetricLearningModule

DIM = 32


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))


def _loss_cases() -> dict[str, tuple[Any, Any]]:
    n_classes = 4
    return {
        "triplet_semihard": (losses.TripletMarginLoss(margin=0.2),
                             miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")),
        "triplet_hard": (losses.TripletMarginLoss(margin=0.2),
                         miners.TripletMarginMiner(margin=0.2, type_of_triplets="hard")),
        "contrastive": (losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0), None),
        "multi_similarity": (losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner()),
        "arcface": (losses.ArcFaceLoss(num_classes=n_classes, embedding_size=DIM, margin=28.6, scale=30), None),
        "cosface": (losses.CosFaceLoss(num_classes=n_classes, embedding_size=DIM, margin=0.35, scale=30), None),
        "subcenter_arcface": (losses.SubCenterArcFaceLoss(num_classes=n_classes, embedding_size=DIM, scale=30), None),
        "proxy_anchor": (losses.ProxyAnchorLoss(num_classes=n_classes, embedding_size=DIM), None),
        "supcon": (losses.SupConLoss(temperature=0.1), None),
    }


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from imagegen import make_image_folder

    root = make_image_folder(tmp_path_factory.mktemp("imgs"), n_classes=4, per_class=4, size=32)
    return read_image_folder(root)


@pytest.mark.parametrize("name", list(_loss_cases()))
def test_each_loss_trains_and_lowers_its_loss(name: str, tiny_records: Any) -> None:
    loss, miner = _loss_cases()[name]
    pl.seed_everything(0)
    module = MetricLearningModule(backbone="test_efficientnet", weights="none", embedding_dim=DIM, image_size=32,
                                  loss=loss, miner=miner, lr=3e-3, head_lr=3e-3, loss_lr=3e-2, freeze_bn=False)
    dm = RetrievalDataModule.from_records(tiny_records, val_fraction=0.0, p=4, k=4, batches_per_epoch=1,
                                          preset="none")
    rec = LossRecorder()
    trainer = pl.Trainer(max_steps=12, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[rec])
    trainer.fit(module, datamodule=dm)
    assert len(rec.losses) == 12
    first, last = sum(rec.losses[:3]) / 3, sum(rec.losses[-3:]) / 3
    assert last < first, f"{name}: loss did not go down ({rec.losses})"


def test_loss_embedding_size_mismatch_is_explained() -> None:
    with pytest.raises(ModelError, match="embedding_size"):
        MetricLearningModule(backbone="test_efficientnet", weights="none", embedding_dim=DIM,
                             loss=losses.ArcFaceLoss(num_classes=3, embedding_size=DIM + 1))


def test_frozen_backbone_warmup_then_unfreezes(tiny_records: Any) -> None:
    module = MetricLearningModule(backbone="test_efficientnet", weights="none", embedding_dim=DIM, image_size=32)
    dm = RetrievalDataModule.from_records(tiny_records, val_fraction=0.0, p=4, k=2, batches_per_epoch=2)
    before = {n: p.detach().clone() for n, p in module.model.backbone.named_parameters()}
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[FreezeBackbone(epochs=1)])
    trainer.fit(module, datamodule=dm)
    after = dict(module.model.backbone.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before), "backbone changed while frozen"
    trainer2 = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                          callbacks=[FreezeBackbone(epochs=1)])
    trainer2.fit(module, datamodule=dm)
    assert any(not torch.equal(before[n], p) for n, p in module.model.backbone.named_parameters())


def test_frozen_stages_stay_pretrained_through_warmup_and_unfreeze(tiny_records: Any) -> None:
    module = MetricLearningModule(backbone="test_efficientnet", weights="none", embedding_dim=DIM, image_size=32,
                                  freeze_bn=False, frozen_stages=2, lr=1e-2)
    backbone = module.model.backbone
    frozen = set(backbone.stage_parameters()[0] + backbone.stage_parameters()[1])
    assert frozen and {n for n, p in backbone.model.named_parameters() if not p.requires_grad} == frozen
    state = {n: t.detach().clone() for n, t in backbone.model.state_dict().items()}
    dm = RetrievalDataModule.from_records(tiny_records, val_fraction=0.0, p=4, k=2, batches_per_epoch=2)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[FreezeBackbone(epochs=1)])
    trainer.fit(module, datamodule=dm)
    after = backbone.model.state_dict()
    # the stem and first stage: weights and BatchNorm running statistics as they were
    owners = {n.rsplit(".", 1)[0] for n in frozen}
    kept = [n for n in state if n.rsplit(".", 1)[0] in owners]
    assert any("running_mean" in n for n in kept)
    assert all(torch.equal(state[n], after[n]) for n in kept)
    # the rest of the backbone trained after the warm-up epoch, its BatchNorm statistics too
    moved = [n for n in state if n not in kept and not torch.equal(state[n], after[n])]
    assert any("running_mean" in n for n in moved) and any(n.endswith("weight") for n in moved)
    assert all(not p.requires_grad for n, p in backbone.model.named_parameters() if n in frozen)
    module.train()
    assert all(not m.training for m in backbone._frozen_norms) and backbone.training


def test_frozen_stages_out_of_range_or_torchvision_is_explained() -> None:
    with pytest.raises(ModelError, match=r"frozen_stages=99 .* choose 0\.\.\d"):
        MetricLearningModule(backbone="test_efficientnet", weights="none", embedding_dim=DIM, frozen_stages=99)
    with pytest.raises(ModelError, match="timm backbone"):
        MetricLearningModule(backbone="tv:resnet18", weights="none", embedding_dim=DIM, frozen_stages=1)


def test_auto_workers_follow_the_cores() -> None:
    from deepfeat.finetune.inference.embed import auto_num_workers

    assert auto_num_workers("cpu", cores=2) == 0
    assert auto_num_workers("cpu", cores=16) == 4


def test_progressive_resizing_trains_small_first_then_at_full_size(tiny_records: Any) -> None:
    module = MetricLearningModule(backbone="test_efficientnet", weights="none", embedding_dim=DIM, image_size=32,
                                  progressive_size=16, progressive_fraction=0.5)
    seen: list[tuple[bool, tuple[int, int]]] = []
    module.model.backbone.register_forward_pre_hook(
        lambda m, args: seen.append((module.training, tuple(args[0].shape[-2:]))))
    dm = RetrievalDataModule.from_records(tiny_records, val_fraction=0.25, p=3, k=2, batches_per_epoch=4)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    train = [size for training, size in seen if training]
    assert train == [(16, 16)] * 4 + [(32, 32)] * 4  # 8 steps: the first half small
    assert {size for training, size in seen if not training} == {(32, 32)}  # validation at the full size
    assert module.training_progress() == 1.0


def test_progressive_resizing_settings_are_checked() -> None:
    with pytest.raises(ModelError, match=r"progressive_size must be an int from 16 up to .* input height 32, got 32"):
        MetricLearningModule(backbone="test_efficientnet", weights="none", embedding_dim=DIM, image_size=32,
                             progressive_size=32)
    with pytest.raises(ModelError, match=r"progressive_fraction .* in \(0, 1\); got 1.0"):
        MetricLearningModule(backbone="test_efficientnet", weights="none", embedding_dim=DIM, image_size=32,
                             progressive_size=16, progressive_fraction=1.0)
