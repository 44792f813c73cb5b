"""``deepfeat evaluate`` says what it measures: the data, the split and its query/gallery counts, which data it
uses without ``--data``, and a warning when the bundle's card records other training data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.imagegen import make_image_folder

from deepfeat.finetune.data.readers import read_image_folder
from deepfeat.finetune.data.writer import write_manifest
from deepfeat.finetune.inference.evaluate import evaluation_header, training_data_warning
from deepfeat.finetune.models.bundle import export_bundle
from deepfeat.finetune.models.model import build_embedding_model
from deepfeat.recipes.cli import main


def _bundle(path: Path, training: dict[str, object]) -> Path:
    model = build_embedding_model("test_efficientnet", "none", embedding_dim=8, image_size=32)
    return export_bundle(model, path, training=training, torchscript=False, onnx=False)


def _test_manifest(folder: Path, out: Path) -> Path:
    test = read_image_folder(folder).assign(split="test")
    return write_manifest(test.drop(columns=["is_query", "is_gallery"]), out)


def test_the_table_names_data_split_and_counts_and_other_training_data_is_warned(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_image_folder(tmp_path / "imgs", n_classes=3, per_class=4, size=32)
    manifest = _test_manifest(data, tmp_path / "test.csv")
    bundle = _bundle(tmp_path / "bundle", {"data_source": "/elsewhere/catalogue", "classes_train": ["shoe", "bag"]})
    metrics = tmp_path / "metrics.json"
    assert main(["evaluate", "--config", "fashion", "--bundle", str(bundle), "--data", str(manifest),
                 "--split-mode", "as_is", "--limit-per-class", "0", "--num-workers", "0", "--baseline-weights", "none",
                 "--json", str(metrics)]) == 0
    captured = capsys.readouterr()
    header = f"data {str(manifest)!r}, split 'test': 12 queries against 12 gallery images, 3 classes"
    lines = captured.out.splitlines()
    table_at = next(i for i, line in enumerate(lines) if "recall_at_1" in line)
    assert lines[table_at - 1] == header  # the line right above the table
    assert "no --data" not in captured.out
    assert "warning" in captured.err and "share none" in captured.err and "'/elsewhere/catalogue'" in captured.err
    saved = json.loads(metrics.read_text())
    assert saved["data"] == str(manifest) and saved["split"] == "test"
    assert saved["fine-tuned"]["n_queries"] == 12


def test_without_data_the_config_source_is_named_before_the_work(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    data = make_image_folder(tmp_path / "imgs", n_classes=3, per_class=4, size=32)
    manifest = _test_manifest(data, tmp_path / "test.csv")
    config = tmp_path / "mine.yaml"
    config.write_text(f"data:\n  source: {manifest}\n  split_mode: as_is\n  limit_per_class: null\n")
    bundle = _bundle(tmp_path / "bundle", {"data_source": str(manifest)})
    assert main(["evaluate", "--config", str(config), "--bundle", str(bundle), "--num-workers", "0",
                 "--baseline-weights", "none"]) == 0
    captured = capsys.readouterr()
    first = captured.out.splitlines()[0]
    assert first.startswith("no --data: evaluating on the config's data.source") and str(manifest) in first
    assert "warning" not in captured.err  # trained on the very data it is scored on


def test_training_data_warning_rules() -> None:
    assert training_data_warning({}, "x", ["a"]) is None  # nothing recorded: nothing to say
    assert training_data_warning({"data_source": "<records>", "classes_train": ["a", "b"]}, "x", ["b", "c"]) is None
    disjoint = training_data_warning({"classes_train": ["a"]}, "x", ["b"])
    assert disjoint is not None and "share none" in disjoint
    other = training_data_warning({"data_source": "fashion-mnist"}, "catalogue", ["a"])
    assert other is not None and "'fashion-mnist'" in other and "'catalogue'" in other


def test_header_counts_queries_and_gallery(tmp_path: Path) -> None:
    records = read_image_folder(make_image_folder(tmp_path / "imgs", n_classes=2, per_class=3, size=16))
    records = records.assign(is_query=[True, False] * 3, is_gallery=True)
    assert evaluation_header("imgs", "val", records) == ("data 'imgs', split 'val': 3 queries against 6 gallery "
                                                         "images, 2 classes")
