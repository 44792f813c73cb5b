"""The quickstart, end to end in its reduced mode: real data, real training, real Milvus Lite, a picture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from support.imagegen import make_image_folder

from deepfeat.recipes.cli import main
from deepfeat.recipes.quickstart import QuickstartOptions, run_quickstart

FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


@pytest.mark.skipif(not FMNIST.exists(),
                    reason="Debian package dataset-fashion-mnist not installed (make test installs it)")
def test_quickstart_tiny_on_fashion_mnist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "qs"
    assert main(["quickstart", "--tiny", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "off-the-shelf" in printed and "fine-tuned" in printed and "picture:" in printed
    assert "held-out test split (" in printed and "queries vs" in printed
    report = json.loads((out / "quickstart.json").read_text())
    assert set(report["metrics"]) == {"off-the-shelf", "fine-tuned"}
    n_gallery = report["metrics"]["fine-tuned"]["n_gallery"]
    assert report["n_loaded"] == n_gallery == 120  # 12 test images x 10 classes, all in Milvus
    assert report["n_skipped"] == 0 and "skipped:" not in printed
    assert json.loads(Path(report["skipped_report"]).read_text()) == {"n_skipped": 0, "skipped": []}
    for search in report["searches"]:
        ids = [h["id"] for h in search["hits"]]
        assert len(ids) == 6 and search["query"] not in ids and len(set(ids)) == 6
        scores = [h["score"] for h in search["hits"]]
        assert scores == sorted(scores, reverse=True)
    with Image.open(out / "quickstart_results.png") as im:
        assert im.width > 500 and im.height > 500


def test_quickstart_on_an_image_folder(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "imgs", n_classes=4, per_class=8, size=32)
    opts = QuickstartOptions(data=str(data), out=str(tmp_path / "qs"), train_per_class=None, image_size=32,
                             max_epochs=1, batches_per_epoch=3, num_workers=0, n_queries=3, top_k=3, progress=False)
    res = run_quickstart(opts)
    assert res.picture.is_file()
    assert res.n_loaded == res.metrics["fine-tuned"]["n_gallery"] > 0
    # the stripes-per-class images are easy: even a few steps retrieve the right class first
    assert res.metrics["fine-tuned"]["recall_at_1"] >= 0.5


def test_quickstart_explains_missing_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quickstart", "--tiny", "--quiet", "--data", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "error" in err


def test_recipe_run_prints_the_test_table_of_the_bundle_it_loaded(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``deepfeat recipe run``: the held-out before/after is printed and stored in recipe.json and the card, and its
    figures are those of the exported bundle embedded again on the same test split."""
    from deepfeat.finetune.data.readers import read_records
    from deepfeat.finetune.data.splits import split_by_group
    from deepfeat.finetune.inference.evaluate import evaluate_models
    from deepfeat.finetune.models.bundle import ModelBundle

    data = make_image_folder(tmp_path / "imgs", n_classes=4, per_class=8, size=32)
    out = tmp_path / "run"
    sets = ["model.backbone=test_efficientnet", "model.weights=none", "model.image_size=32", "trainer.max_epochs=1",
            "data.batches_per_epoch=2", "data.num_workers=0", "recipe.quickstart.train_per_class=null",
            "recipe.quickstart.n_queries=2", "recipe.quickstart.top_k=2"]
    assert main(["recipe", "run", "quickstart", "--data", str(data), "--out", str(out), "--quiet", "--set",
                 *sets]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "recipe.json").read_text())
    exported = report["test_exported"]
    assert exported in report["test"] and report["test_table"] in printed and report["test_message"] in printed
    # the quickstart reader's split of a folder (50/25/25 within classes, seed 0), again and independently
    records = split_by_group(read_records(str(data)), fractions=(0.5, 0.25, 0.25), seed=0)
    test = records[records["split"] == "test"]
    bundle = ModelBundle.load(report["bundle"])
    again = evaluate_models({"bundle": bundle.model}, test, batch_size=16)["bundle"]
    assert len(test) == report["test"][exported]["n_queries"]
    for key in ("recall_at_1", "map_at_r"):
        assert report["test"][exported][key] == pytest.approx(again[key], abs=1e-6)
        assert bundle.card.metrics[f"test/{exported}/{key}"] == pytest.approx(again[key], abs=1e-6)
