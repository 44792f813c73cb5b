"""``deepfeat layers`` on a tiny generated image folder: table, CSV, PNG, and the saved FNE bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from deepfeat.finetune.inference.evaluate import embed_records
from deepfeat.finetune.metrics import retrieval_metrics_from_records
from deepfeat.finetune.models.bundle import ModelBundle
from deepfeat.recipes.cli import main
from deepfeat.recipes.layers import select_records

CLASSES = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 70, 220)}
PER_CLASS = 4


def _write_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:24, 0:24]
    for k, (name, colour) in enumerate(CLASSES.items()):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            stripes = (np.sin((xx if k % 2 else yy) / rng.uniform(1.5, 3.0)) > 0)[..., None]
            pixels = stripes * np.array(colour) * rng.uniform(0.7, 1.0) + rng.normal(0, 10, (24, 24, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def test_layers_command_writes_table_plot_and_fne_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write_folder(tmp_path / "images")
    out = tmp_path / "report"
    rc = main(
        [
            "layers",
            "--data",
            str(data),
            "--weights",
            "none",
            "--image-size",
            "32",
            "--limit-per-class",
            "0",
            "--batch-size",
            "5",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--save-fne",
            str(tmp_path / "fne"),
        ]
    )
    assert rc == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "FNE ternary" in printed and "INT8_VECTOR" in printed and "best single layer" in printed
    # what it does is said before the work starts, and the pass over the images shows a progress bar
    assert printed.startswith("deepfeat layers: tf_efficientnet_lite0 on ")
    assert "layers: evaluated images (9 layers)" in captured.err

    table = pd.read_csv(out / "layers.csv")
    assert (table["kind"] == "layer").sum() == 9  # Lite0: stem, 7 blocks, head
    reps = table["representation"].tolist()
    assert "head (last layer)" in reps and "concat all layers" in reps and "FNE standardised" in reps
    assert {"recall_at_1", "map_at_r", "dim", "bytes_per_vector"} <= set(table.columns)
    assert (table["n_queries"] == len(CLASSES) * PER_CLASS).all()
    assert table[["recall_at_1", "map_at_r"]].apply(lambda c: c.between(0, 1)).all().all()
    concat = table.set_index("representation").loc["concat all layers"]
    assert concat["dim"] == table[table["kind"] == "layer"]["dim"].sum()
    png = (out / "layers.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000

    # The saved bundle embeds with the statistics of the sweep: its metrics are the table's.
    bundle = ModelBundle.load(tmp_path / "fne")
    records, _, split = select_records(str(data), limit_per_class=None)
    assert split == "train"
    emb, kept = embed_records(bundle.model, records)
    assert set(np.unique(np.sign(emb)).tolist()) <= {-1.0, 0.0, 1.0}
    metrics = retrieval_metrics_from_records(emb, records.iloc[kept].reset_index(drop=True))
    ternary = table.set_index("representation").loc["FNE ternary (float32/int8, COSINE)"]
    assert metrics["recall_at_1"] == pytest.approx(ternary["recall_at_1"])
    assert metrics["map_at_r"] == pytest.approx(ternary["map_at_r"])


def test_layers_command_names_a_missing_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _write_folder(tmp_path / "images")
    rc = main(["layers", "--data", str(data), "--split", "test", "--out", str(tmp_path / "r")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no 'test' split" in err and "--split" in err
