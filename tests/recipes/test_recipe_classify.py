"""The classify recipe: kNN labels from a labelled collection, accuracy on a held-out labelled split."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image
from support.imagegen import class_image, make_image_folder
from support.recipes import TINY

from deepfeat.finetune.errors import DataError
from deepfeat.recipes.classify import vote
from deepfeat.recipes.cli import main

N_CLASSES = 4


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    base = tmp_path_factory.mktemp("classify")
    labelled = make_image_folder(base / "labelled", n_classes=N_CLASSES, per_class=10, size=32)
    unlabelled = base / "unlabelled"  # new images of known classes, in a flat folder, named by their truth
    unlabelled.mkdir()
    for c in range(N_CLASSES):
        for i in range(3):
            Image.fromarray(class_image(c, 100 + i, 32, seed=5)).save(unlabelled / f"class_{c:02d}-{i}.png")
    out = base / "out"
    code = main(
        [
            "recipe",
            "run",
            "classify",
            "--data",
            str(labelled),
            "--out",
            str(out),
            "--quiet",
            "--query",
            str(unlabelled),
            "--set",
            *TINY,
            "recipe.classify.k=5",
        ]
    )
    assert code == 0
    return unlabelled, out, json.loads((out / "recipe.json").read_text())


def test_knn_accuracy_well_above_chance(classify_run: tuple[Path, Path, dict]) -> None:
    _, out, report = classify_run
    summary = report["summary"]
    assert report["n_loaded"] == 40 and summary["split"] == "test" and summary["k"] == 5
    assert summary["n"] == 8 and summary["n_reference"] == 32  # 2 of 10 per class held out (fractions 0.6/0.2/0.2)
    assert summary["chance"] == 1 / N_CLASSES
    assert summary["accuracy"] >= 0.75  # chance is 0.25
    with open(out / "predictions_labelled.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8 and all(r["predicted"].startswith("class_") for r in rows)
    assert sum(r["correct"] == "True" for r in rows) / len(rows) == summary["accuracy"]


def test_unlabelled_images_get_labels(classify_run: tuple[Path, Path, dict]) -> None:
    _, out, report = classify_run
    predictions = report["summary"]["unlabelled"]
    assert len(predictions) == 12
    right = [p["predicted"] == Path(p["source"]).name.split("-")[0] for p in predictions]
    assert sum(right) / len(right) >= 0.75
    assert all(0 < p["confidence"] <= 1 for p in predictions)
    assert len((out / "predictions.csv").read_text().splitlines()) == 13


def test_classify_command_on_the_existing_collection(
    classify_run: tuple[Path, Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unlabelled, _, report = classify_run
    csv_path = tmp_path / "p.csv"
    assert (
        main(
            [
                "classify",
                "--uri",
                report["uri"],
                "--collection",
                "classify",
                "--bundle",
                report["bundle"],
                "--data",
                str(unlabelled),
                "--labelled-split",
                "test",
                "--k",
                "5",
                "--out",
                str(csv_path),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert f"on split 'test': {report['summary']['accuracy']:.4f} over 8 records" in printed
    assert "labelled 12 image(s)" in printed and len(csv_path.read_text().splitlines()) == 13
    assert main(["classify", "--uri", report["uri"], "--collection", "classify"]) == 2
    assert "--labelled-split" in capsys.readouterr().err


def test_vote_weights_by_similarity() -> None:
    hits = [{"label": "a", "score": 0.9}, {"label": "b", "score": 0.5}, {"label": "b", "score": 0.45}]
    assert vote(hits).label == "b" and vote(hits).confidence == pytest.approx(0.95 / 1.85, abs=1e-4)
    assert vote([hits[0], {"label": "b", "score": 0.1}]).label == "a"
    assert vote([{"label": "a", "score": 0.2}, {"label": "b", "score": 5.0}], metric="L2").label == "a"
    assert vote(hits, weighting="uniform").label == "b" and vote([]).label is None
    with pytest.raises(DataError, match="weighting"):
        vote(hits, weighting="nearest")  # type: ignore[arg-type]


FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


@pytest.mark.skipif(
    not FMNIST.exists(), reason="Debian package dataset-fashion-mnist not installed (make test installs it)"
)
def test_classify_recipe_defaults_on_fashion_mnist(tmp_path: Path) -> None:
    """The shipped YAML as it is (real ImageNet EfficientNet-Lite0, SupCon loss, Fashion-MNIST), only made small."""
    from deepfeat.recipes.engine import run_recipe

    small = [
        "model.image_size=32",
        "trainer.max_epochs=1",
        "data.batches_per_epoch=2",
        "data.p=5",
        "data.k=4",
        "data.num_workers=0",
        "data.limit_per_class=10",
        "model.max_minutes=null",
    ]
    res = run_recipe("classify", out=tmp_path / "out", overrides=small)
    assert res.n_loaded == res.n_records == 300  # 10 per class in each of train/val/test
    assert res.summary["n"] == 100 and res.summary["chance"] == 0.1
    assert res.summary["accuracy"] >= 0.3  # real features on real images: well above chance
