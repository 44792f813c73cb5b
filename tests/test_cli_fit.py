"""``deepfeat fit|test --config recipe.yaml`` through LightningCLI, then export, embed and evaluate from the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from imagegen import make_image_folder

from deepfeat.finetune.models.bundle import ModelBundle
from deepfeat.recipes.cli import main

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "fashion.yaml"


def _overrides(data: Path, run: Path, config: Path = RECIPE) -> list[str]:
    return [
        "--config", str(config),
        f"--data.source={data}", "--data.split_mode=by_group", "--data.fractions=[0.5,0.25,0.25]",
        "--data.limit_per_class=null", "--data.p=3", "--data.k=2", "--data.batches_per_epoch=2",
        "--data.num_workers=0", "--data.eval_batch_size=16",
        "--model.backbone=test_efficientnet", "--model.weights=none", "--model.image_size=32",
        "--model.embedding_dim=16", "--trainer.max_epochs=2", f"--trainer.default_root_dir={run}",
        "--trainer.enable_progress_bar=false",
    ]


def test_print_config_shows_the_loss_spelt_out(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(RECIPE), "--print_config"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "pytorch_metric_learning.losses.MultiSimilarityLoss" in out and "init_args" in out


def test_fit_export_embed_evaluate_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_image_folder(tmp_path / "imgs", n_classes=4, per_class=8, size=32)
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # the recipe's ExportBundle writes runs/fashion/bundle relative to the cwd
    bundle_dir = tmp_path / "runs" / "fashion" / "bundle"
    # the guard would keep the random test backbone's "off-the-shelf" features half the time: export what trained
    unguarded = tmp_path / "fashion-unguarded.yaml"
    unguarded.write_text(RECIPE.read_text().replace("guard: true", "guard: false"))
    assert main(["fit", *_overrides(data, run, unguarded)]) == 0
    ckpts = sorted(run.rglob("best*.ckpt"))
    assert ckpts, f"no best checkpoint under {run}"
    bundle = ModelBundle.load(bundle_dir)
    assert bundle.dim == 16
    assert bundle.card.training["loss"] == "MultiSimilarityLoss"

    exported = tmp_path / "exported"
    assert main(["export", "--ckpt", str(ckpts[0]), "--out", str(exported), "--no-onnx"]) == 0
    assert ModelBundle.load(exported).dim == 16

    shards = tmp_path / "shards"
    assert main(["embed", "--bundle", str(exported), "--data", str(data), "--out", str(shards), "--num-workers", "0",
                 "--quiet"]) == 0
    table = pq.read_table(sorted(shards.glob("part-*.parquet"))[0])
    assert table.num_rows == 32 and table.schema.field("vector").type.list_size == 16
    # bf16 autocast on the CPU: the same images, vectors within bf16 rounding of the float32 ones
    shards_bf16 = tmp_path / "shards-bf16"
    assert main(["embed", "--bundle", str(exported), "--data", str(data), "--out", str(shards_bf16),
                 "--num-workers", "0", "--quiet", "--precision", "bf16"]) == 0
    table_bf16 = pq.read_table(sorted(shards_bf16.glob("part-*.parquet"))[0])
    assert table_bf16.column("id").to_pylist() == table.column("id").to_pylist()
    fp32_vectors = np.array(table.column("vector").to_pylist())
    bf16_vectors = np.array(table_bf16.column("vector").to_pylist())
    cosines = (fp32_vectors * bf16_vectors).sum(axis=1)
    assert cosines.min() > 0.98 and not np.array_equal(fp32_vectors, bf16_vectors), cosines
    capsys.readouterr()

    # an evaluation manifest: every image is a test query against all the others
    from deepfeat.finetune.data.readers import read_image_folder
    from deepfeat.finetune.data.writer import write_manifest

    test = read_image_folder(data).assign(split="test")
    manifest = write_manifest(test.drop(columns=["is_query", "is_gallery"]), tmp_path / "test.csv")
    metrics_json = tmp_path / "metrics.json"
    assert main(["evaluate", "--config", str(RECIPE), "--bundle", str(exported), "--data", str(manifest),
                 "--split-mode", "as_is", "--limit-per-class", "0", "--num-workers", "0",
                 "--baseline-weights", "none",
                 "--json", str(metrics_json)]) == 0
    printed = capsys.readouterr().out
    assert "off-the-shelf" in printed and "fine-tuned" in printed and "delta" in printed
    import json

    rows = json.loads(metrics_json.read_text())
    assert 0.0 <= rows["fine-tuned"]["recall_at_1"] <= 1.0 and rows["off-the-shelf"]["n_queries"] == 32


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["embed", "--bundle", str(tmp_path / "missing"), "--data", str(tmp_path), "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deepfeat: error:") and "not a deepfeat model bundle" in err and "\n" not in err
