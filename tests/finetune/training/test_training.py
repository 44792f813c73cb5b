"""Real Lightning training on tiny real images: every supported loss lowers its loss; CLI fit/export."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from pytorch_metric_learning import losses, miners

from deepfeat.finetune.data.readers import read_image_folder
from deepfeat.finetune.errors import DataError, ModelError
from deepfeat.finetune.training.callbacks import ExportBundle, FreezeBackbone
from deepfeat.finetune.training.datamodule import RetrievalDataModule
from deepfeat.finetune.training.module import MetricLearningModule
from deepfeat.finetune.training.pipeline import guarded_fit

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
    from support.imagegen import make_image_folder

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


FASHION = Path(__file__).resolve().parents[3] / "recipes" / "configs" / "fashion.yaml"


def _fit_args(data: Path, run: Path, config: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(config), f"--data.source={data}", "--data.split_mode=by_group",
            "--data.fractions=[0.5,0.25,0.25]", "--data.p=4", "--data.k=2", "--data.batches_per_epoch=2",
            "--data.num_workers=0", "--data.eval_batch_size=16", "--model.backbone=test_efficientnet",
            "--model.weights=none", "--model.image_size=32", "--model.embedding_dim=16", "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={run}", "--trainer.enable_progress_bar=false", *extra]


def test_deepfeat_fit_prints_the_test_table_of_the_bundle_it_exported(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """``deepfeat fit`` on the shipped fashion YAML (flip TTA) prints the held-out before/after; its
    figures are those of the exported bundle, embedded again on the same test split."""
    from support.imagegen import make_image_folder

    from deepfeat.finetune.inference.evaluate import evaluate_models
    from deepfeat.finetune.models.bundle import ModelBundle
    from deepfeat.recipes.cli import main

    data = make_image_folder(tmp_path / "imgs", n_classes=4, per_class=8, size=32)
    monkeypatch.chdir(tmp_path)  # the recipe's ExportBundle writes runs/fashion/bundle relative to the cwd
    config = tmp_path / "fashion.yaml"  # guard off: the random test backbone's baseline might be kept
    config.write_text(FASHION.read_text().replace("guard: true", "guard: false"))
    caplog.set_level(logging.INFO, logger="deepfeat.finetune.training.callbacks")
    assert main(_fit_args(data, tmp_path / "run", config)) == 0
    printed = capsys.readouterr().out
    assert "held-out test split" in printed and "off-the-shelf" in printed and "fine-tuned" in printed
    exported = next(r.getMessage() for r in caplog.records if "exporting the best checkpoint" in r.getMessage())
    assert re.search(r"\(val/map_at_r \d\.\d{4}\)$", exported), exported  # a number, not a tensor's repr
    bundle = ModelBundle.load(tmp_path / "runs" / "fashion" / "bundle")
    assert bundle.card.training["test_exported"] == "fine-tuned" and bundle.model.flip_tta
    # the same split again, independently of the fit: the data module is deterministic for a seed
    test = RetrievalDataModule(source=str(data), split_mode="by_group", fractions=(0.5, 0.25, 0.25),
                               val_mode="unseen_groups").split_records("test")
    again = evaluate_models({"bundle": bundle.model}, test, batch_size=16)["bundle"]
    card = bundle.card.metrics
    for key in ("recall_at_1", "map_at_r"):
        assert card[f"test/fine-tuned/{key}"] == pytest.approx(again[key], abs=1e-6)
    line = next(x for x in printed.splitlines() if "queries vs" in x)
    assert f"Recall@1 {again['recall_at_1']:.4f} fine-tuned" in line and f"MAP@R {again['map_at_r']:.4f} vs" in line


def test_fit_without_a_test_split_says_how_to_add_one(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from support.imagegen import make_image_folder

    from deepfeat.recipes.cli import main

    data = make_image_folder(tmp_path / "imgs", n_classes=4, per_class=6, size=32)
    monkeypatch.chdir(tmp_path)
    assert main(_fit_args(data, tmp_path / "run", FASHION, "--data.fractions=[0.5,0.5,0.0]")) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "no held-out test split" in x]
    assert len(lines) == 1 and "data.fractions" in lines[0] and "'split' column" in lines[0]


def test_a_validation_split_of_one_class_is_refused_before_training(tmp_path: Path, tiny_records: Any) -> None:
    records = tiny_records.copy()
    records["split"] = "train"
    records.loc[records["label"] == records["label"].iloc[0], "split"] = "val"  # one class only
    dm = RetrievalDataModule.from_records(records, split_mode="as_is", p=3, k=2, batches_per_epoch=2)
    module = MetricLearningModule(backbone="test_efficientnet", weights="none", image_size=32, embedding_dim=DIM)
    recorder = LossRecorder()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         default_root_dir=str(tmp_path), callbacks=[ExportBundle(dirpath=str(tmp_path / "b")),
                                                                    recorder])
    with pytest.raises(DataError) as exc:
        guarded_fit(module, dm, trainer)
    message = str(exc.value)
    assert "\n" not in message and "'val'" in message and "1 class(es)" in message
    assert recorder.losses == []  # refused before the first step
