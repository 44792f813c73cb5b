"""The cluster recipe: k-means on the loaded embeddings, assignments CSV and a picture per cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from support.imagegen import make_image_folder
from support.recipes import TINY

from deepfeat.connectors import connect
from deepfeat.finetune.errors import DataError
from deepfeat.recipes.cli import main
from deepfeat.recipes.cluster import cluster_collection


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    base = tmp_path_factory.mktemp("cluster")
    data = make_image_folder(base / "images", n_classes=4, per_class=8, size=32)
    out = base / "out"
    code = main(
        [
            "recipe",
            "run",
            "cluster",
            "--data",
            str(data),
            "--out",
            str(out),
            "--quiet",
            "--set",
            *TINY,
            "recipe.cluster.per_cluster=4",
            "data.fractions=[0.5,0.25,0.25]",
        ]
    )
    assert code == 0
    return out, json.loads((out / "recipe.json").read_text())


def test_clusters_csv_and_picture(cluster_run: tuple[Path, dict]) -> None:
    out, report = cluster_run
    summary = report["summary"]
    assert summary["k"] == 4 and len(summary["sizes"]) == 4  # k defaults to the number of labels
    assert sum(summary["sizes"]) == summary["n"] == report["n_loaded"] == 32
    assert summary["sizes"] == sorted(summary["sizes"], reverse=True) and min(summary["sizes"]) >= 1
    table = pd.read_csv(out / "clusters.csv")
    assert len(table) == 32 and set(table["cluster"]) == {0, 1, 2, 3} and table["record_id"].is_unique
    assert table.groupby("cluster").size().tolist() == summary["sizes"]
    assert summary["purity"] >= 0.5 and summary["ari"] > 0.1  # the stripe classes are found (chance purity ~0.25)
    with Image.open(out / "clusters.png") as im:
        assert im.width > 200 and im.height > 300  # 4 rows of 4 thumbnails


def test_cluster_command_on_the_existing_collection(
    cluster_run: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, report = cluster_run
    assert (
        main(["cluster", "--uri", report["uri"], "--collection", "cluster", "--k", "3", "--out", str(tmp_path / "c")])
        == 0
    )
    assert "3 clusters of 32 records" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "c" / "clusters.csv")) == 32 and (tmp_path / "c" / "clusters.png").is_file()
    with connect(report["uri"]) as conn:
        two = cluster_collection(conn, "cluster", 2, filter='label in ["class_00", "class_01"]')
        assert len(two.assignments) == 16 and sorted(two.sizes, reverse=True) == two.sizes
        with pytest.raises(DataError, match="k must be between 2 and"):
            cluster_collection(conn, "cluster", 40)


def test_a_corrupt_image_is_skipped_listed_and_not_loaded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_image_folder(tmp_path / "images", n_classes=2, per_class=4, size=32)
    (data / "class_00" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not the rest of a JPEG")
    out = tmp_path / "out"
    assert main(["recipe", "run", "cluster", "--data", str(data), "--out", str(out), "--quiet", "--set", *TINY,
                 "recipe.train=false", "recipe.cluster.per_cluster=2"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "recipe.json").read_text())
    assert (report["n_records"], report["n_loaded"], report["n_skipped"]) == (9, 8, 1)
    skipped = json.loads(Path(report["skipped_report"]).read_text())
    assert skipped["n_skipped"] == 1 and skipped["skipped"][0]["source"].endswith("truncated.jpg")
    assert f"skipped:  1 image(s) that do not decode, not loaded; listed in {out / 'skipped.json'}" in printed
    conn = connect(str(out / "milvus.db"))
    try:
        assert conn.count(report["collection"]) == 8
    finally:
        conn.close()
