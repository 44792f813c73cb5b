"""The dedup recipe: planted exact and near duplicates are grouped by range search; distinct images are not."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.recipes import TINY, jpeg_bytes, scene

from deepfeat.connectors import connect
from deepfeat.finetune.errors import DataError
from deepfeat.recipes.cli import main
from deepfeat.recipes.dedup import find_duplicates

THRESHOLD = 0.97
PLANTED = [
    ["a/a0.png", "a/a0_copy.png"],  # byte-identical copy
    ["a/a1.png", "a/a1_small.png"],  # resized to 75 %
    ["b/b0.png", "b/b0_reencoded.jpg", "b/b0_reencoded_small.jpg"],  # JPEG re-encoded, and resized + re-encoded
]


@pytest.fixture(scope="module")
def dedup_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    base = tmp_path_factory.mktemp("dedup")
    root = base / "images"
    seed = 0
    for label in "abc":  # 3 classes x 5 distinct random scenes
        (root / label).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(scene(seed)).save(root / label / f"{label}{i}.png")
            seed += 1
    shutil.copy(root / "a/a0.png", root / "a/a0_copy.png")
    with Image.open(root / "a/a1.png") as im:
        im.resize((96, 96), Image.Resampling.BILINEAR).save(root / "a/a1_small.png")
    b0 = np.asarray(Image.open(root / "b/b0.png").convert("RGB"))
    (root / "b/b0_reencoded.jpg").write_bytes(jpeg_bytes(b0, quality=75))
    small = np.asarray(Image.fromarray(b0).resize((80, 80), Image.Resampling.BILINEAR))
    (root / "b/b0_reencoded_small.jpg").write_bytes(jpeg_bytes(small, quality=80))
    out = base / "out"
    code = main(
        [
            "recipe",
            "run",
            "dedup",
            "--data",
            str(root),
            "--out",
            str(out),
            "--quiet",
            "--set",
            *TINY,
            "model.image_size=64",
            f"recipe.dedup.threshold={THRESHOLD}",
            "data.fractions=[0.4,0.3,0.3]",
        ]
    )
    assert code == 0
    return out, json.loads((out / "recipe.json").read_text())


def test_planted_duplicates_are_grouped_and_nothing_else(dedup_run: tuple[Path, dict]) -> None:
    out, report = dedup_run
    summary = report["summary"]
    assert report["n_loaded"] == summary["n_records"] == 19
    assert sorted(summary["groups"]) == sorted(PLANTED)
    assert summary["n_groups"] == 3 and summary["n_duplicates"] == 4
    with open(out / "duplicates.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 7 and {r["record_id"] for r in rows} == {i for g in PLANTED for i in g}
    assert sum(r["keep"] == "True" for r in rows) == 3  # one representative per group
    for r in rows:
        assert float(r["best_score"]) > THRESHOLD and Path(r["path"]).is_file()
    copy = next(r for r in rows if r["record_id"] == "a/a0_copy.png")
    assert float(copy["best_score"]) == pytest.approx(1.0, abs=1e-4)
    assert (out / "duplicates.png").is_file()


def test_dedup_command_on_the_existing_collection(
    dedup_run: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, report = dedup_run
    csv_path = tmp_path / "groups.csv"
    assert (
        main(
            [
                "dedup",
                "--uri",
                report["uri"],
                "--collection",
                "dedup",
                "--threshold",
                str(THRESHOLD),
                "--out",
                str(csv_path),
            ]
        )
        == 0
    )
    assert "3 near-duplicate group(s), 4 removable of 19" in capsys.readouterr().out
    assert len(csv_path.read_text().splitlines()) == 1 + 7
    with connect(report["uri"]) as conn:
        exact = find_duplicates(conn, "dedup", threshold=0.99999)
        assert exact.groups == [PLANTED[0]]  # only the byte-identical copy at (almost) 1.0
        only_b = find_duplicates(conn, "dedup", threshold=THRESHOLD, filter='label == "b"')
        assert only_b.groups == [PLANTED[2]] and only_b.n_records == 7
        with pytest.raises(DataError, match="similarity in"):
            find_duplicates(conn, "dedup", threshold=1.5)


def test_unlabelled_flat_folder_without_training(dedup_run: tuple[Path, dict], tmp_path: Path) -> None:
    """`recipe.train=false`: a folder of loose images, indexed with the off-the-shelf backbone."""
    from deepfeat.recipes.engine import run_recipe

    out, _ = dedup_run
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in (out.parent / "images").rglob("*.*"):
        shutil.copy(path, flat / path.name)
    overrides = [*TINY, "model.image_size=64", f"recipe.dedup.threshold={THRESHOLD}", "recipe.train=false"]
    res = run_recipe("dedup", str(flat), out=tmp_path / "out", overrides=overrides)
    assert res.chosen == "off-the-shelf" and "recipe.train is false" in res.guard_message
    assert res.n_loaded == 19
    assert sorted(res.summary["groups"]) == sorted([[Path(i).name for i in g] for g in PLANTED])
