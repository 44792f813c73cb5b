"""Learned whitening: fitted on labelled embeddings, kept only when it helps on validation, exported in bundles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from deepfeat.finetune.errors import DataError, ModelError
from deepfeat.finetune.metrics import retrieval_metrics_from_records
from deepfeat.finetune.models.bundle import ModelBundle, export_bundle
from deepfeat.finetune.models.model import build_embedding_model
from deepfeat.finetune.training.whiten import apply_whitening, choose_whitening, fit_whitening


def _blobs(n: int, seed: int, noise_axis_std: float = 3.0,
           std: float = 0.3) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Two classes one unit apart on axis 0, with a large within-class spread on axis 1 (shared by both)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(["a", "b"], n)
    x = rng.normal(0, std, (2 * n, 8))
    x[:, 1] *= noise_axis_std / std
    x[:, 2] += 4.0  # away from the origin, so that cosine similarity still sees the classes
    x[n:, 0] += 1.0
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    records = pd.DataFrame({"id": [f"r{i}" for i in range(2 * n)], "label": labels, "is_query": True,
                            "is_gallery": True})
    return x.astype(np.float32), labels, records


def test_whitening_shrinks_the_within_class_direction_and_lifts_recall() -> None:
    train, labels, _ = _blobs(200, seed=0)
    val, _, val_records = _blobs(100, seed=1)
    mean, matrix = fit_whitening(train, labels, reg=0.1)
    assert mean.shape == (8,) and matrix.shape == (8, 8)
    torch.testing.assert_close(matrix, matrix.T)  # symmetric: a whitening, not a rotation
    before = retrieval_metrics_from_records(val, val_records)
    after = retrieval_metrics_from_records(apply_whitening(val, mean, matrix), val_records)
    assert after["recall_at_1"] > before["recall_at_1"] and after["map_at_r"] > before["map_at_r"] + 0.2
    choice = choose_whitening(train, labels, val, val_records, regs=(0.1, 1.0))
    assert choice.reg is not None and set(choice.tried) == {"none", "reg=0.1", "reg=1"}
    assert choice.val["recall_at_1"] >= after["recall_at_1"] - 1e-9 or choice.reg == 1.0


def test_whitening_is_declined_when_it_cannot_help() -> None:
    train, labels, _ = _blobs(100, seed=0, noise_axis_std=0.01, std=0.01)  # already perfectly separated
    val, _, val_records = _blobs(50, seed=1, noise_axis_std=0.01, std=0.01)
    assert retrieval_metrics_from_records(val, val_records)["map_at_r"] == pytest.approx(1.0)
    choice = choose_whitening(train, labels, val, val_records, regs=(0.3,))
    assert choice.reg is None and choice.matrix is None


def test_bad_whitening_input_is_explained() -> None:
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    with pytest.raises(DataError, match="two classes with two images"):
        fit_whitening(x, ["a"] * 6)
    with pytest.raises(DataError, match="reg must be > 0"):
        fit_whitening(x, ["a", "a", "a", "b", "b", "b"], reg=0)
    with pytest.raises(DataError, match="n labels"):
        fit_whitening(x, ["a", "b"])


def test_whitened_model_round_trips_through_its_bundle(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_embedding_model("test_efficientnet", weights="none", embedding_dim=8, image_size=32).eval()
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
    mean, matrix = torch.randn(8) * 0.1, torch.eye(8) + 0.2 * torch.randn(8, 8)
    with pytest.raises(ModelError, match=r"shape \(8,\)"):
        model.set_whitening(torch.zeros(7), matrix)
    plain_bundle = export_bundle(model, tmp_path / "plain", name="m", onnx=False, torchscript=False)
    model.set_whitening(mean, matrix)
    with torch.no_grad():
        whitened = model(x)
    np.testing.assert_allclose(whitened.numpy(), apply_whitening(plain.numpy(), mean, matrix), atol=1e-5)
    path = export_bundle(model, tmp_path / "w", name="m")
    card = json.loads((path / "card.json").read_text())
    assert card["model_config"]["whiten"] is True
    assert card["bundle_id"] != json.loads((plain_bundle / "card.json").read_text())["bundle_id"]
    bundle = ModelBundle.load(path)
    assert bundle.model.whitened
    np.testing.assert_allclose(bundle.embed_tensor(x), whitened.numpy(), atol=1e-5)
    ts = torch.jit.load(str(path / "model.ts"))
    np.testing.assert_allclose(ts(x).detach().numpy(), whitened.numpy(), atol=1e-5)
    model.set_whitening(None, None)
    assert not model.whitened and "whiten_mean" not in model.state_dict()


def test_finetune_with_whitening_exports_what_it_chose(tmp_path: Path) -> None:
    import lightning.pytorch as pl
    from support.imagegen import make_image_folder

    from deepfeat.finetune.data.readers import read_image_folder
    from deepfeat.finetune.training import ExportBundle, MetricLearningModule, RetrievalDataModule
    from deepfeat.finetune.training.pipeline import guarded_fit

    records = read_image_folder(make_image_folder(tmp_path / "imgs", n_classes=4, per_class=6, size=32))
    dm = RetrievalDataModule.from_records(records, split_mode="by_group", fractions=(0.5, 0.5, 0.0), p=4, k=2,
                                          batches_per_epoch=2)
    module = MetricLearningModule(backbone="test_efficientnet", weights="none", image_size=32, embedding_dim=16)
    export = ExportBundle(dirpath=str(tmp_path / "run" / "bundle"), onnx=False, guard=False, whiten=True,
                          whiten_regs=(0.1, 1.0))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         default_root_dir=str(tmp_path / "run"), callbacks=[export])
    result = guarded_fit(module, dm, trainer)
    assert result.test is None and "no held-out test split" in result.test_message
    assert result.whitening is not None and result.whitening["reg"] in (None, 0.1, 1.0)
    assert result.model.whitened == (result.whitening["reg"] is not None)
    assert "whitening" in result.message
    assert result.bundle is not None
    bundle = ModelBundle.load(result.bundle)
    assert bundle.card.training["whitening"]["reg"] == result.whitening["reg"]
    assert bundle.model.whitened == result.model.whitened


def test_export_callback_of_deepfeat_fit_applies_flip_tta_and_whitening(tmp_path: Path) -> None:
    """``deepfeat fit`` (LightningCLI) exports through ``ExportBundle``: the same two steps as ``finetune``."""
    import lightning.pytorch as pl
    from support.imagegen import make_image_folder

    from deepfeat.finetune.data.readers import read_image_folder
    from deepfeat.finetune.training.callbacks import ExportBundle
    from deepfeat.finetune.training.datamodule import RetrievalDataModule
    from deepfeat.finetune.training.module import MetricLearningModule

    records = read_image_folder(make_image_folder(tmp_path / "imgs", n_classes=4, per_class=6, size=32))
    kw: dict[str, Any] = {"split_mode": "by_group", "p": 4, "k": 2, "batches_per_epoch": 2}
    dm = RetrievalDataModule.from_records(records, fractions=(0.5, 0.5, 0.0), **kw)
    module = MetricLearningModule(backbone="test_efficientnet", weights="none", image_size=32, embedding_dim=16)
    export = ExportBundle(dirpath=str(tmp_path / "bundle"), onnx=False, flip_tta=True, whiten=True,
                          whiten_regs=(0.1, 1.0))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, callbacks=[export])
    trainer.fit(module, datamodule=dm)
    assert export.exported is not None
    bundle = ModelBundle.load(export.exported)
    reg = bundle.card.training["whitening"]["reg"]
    assert bundle.model.flip_tta and reg in (None, 0.1, 1.0) and bundle.model.whitened == (reg is not None)

    # no validation split to choose on: refused when fit starts, before any training step
    no_val = RetrievalDataModule.from_records(records, fractions=(1.0, 0.0, 0.0), **kw)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, callbacks=[ExportBundle(dirpath=str(tmp_path / "b2"), whiten=True)])
    with pytest.raises(DataError, match="'val' split"):
        trainer.fit(module, datamodule=no_val)
    assert trainer.global_step == 0 and not (tmp_path / "b2").exists()
