"""``deepfeat fit|test --config recipe.yaml`` through LightningCLI, then export, embed and evaluate from the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from support.imagegen import make_image_folder

from deepfeat.finetune.errors import DataError
from deepfeat.finetune.inference.shards import read_shards
from deepfeat.finetune.models.bundle import ModelBundle
from deepfeat.finetune.training.config import build_training, run_lightning_cli
from deepfeat.recipes.cli import main

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "fashion.yaml"


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
    assert "class_path: pytorch_metric_learning.losses." in out and "init_args" in out


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
    loss_class = yaml.safe_load(RECIPE.read_text())["model"]["loss"]["class_path"]
    assert bundle.card.training["loss"] == loss_class.rpartition(".")[2]

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


@pytest.mark.parametrize("config", ["fashion", "fashion.yaml", "recipes/configs/fashion.yaml"])
def test_config_names_a_shipped_recipe_from_any_folder(config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # outside the checkout: no recipes/configs/ here
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", config, "--print_config"])
    assert exc.value.code == 0
    printed, shipped = yaml.safe_load(capsys.readouterr().out), yaml.safe_load(RECIPE.read_text())
    for section in ("model", "data"):
        assert {k: printed[section][k] for k in shipped[section] if k not in ("loss", "miner")} == {
            k: v for k, v in shipped[section].items() if k not in ("loss", "miner")}


def test_config_refusals_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", "no-such-recipe"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no-such-recipe" in err and "fashion" in err and "\n" not in err  # the shipped names are listed
    assert main(["fit", "--config", "fashion", "--trainer.max_epoch=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "did you mean 'trainer.max_epochs'" in err and "\n" not in err and "usage" not in err


def test_optimizer_and_lr_scheduler_then_predict_writes_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_image_folder(tmp_path / "imgs", n_classes=4, per_class=8, size=32)
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    # no callbacks: no guard or export, only the training loop and Lightning's own last checkpoint
    small = [*_overrides(data, run), "--trainer.max_epochs=2", "--trainer.callbacks=[]"]
    cli = run_lightning_cli(["fit", *small, "--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.01",
                             "--lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size", "1"])
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD)
    recipe = yaml.safe_load(RECIPE.read_text())["model"]
    head_ratio = recipe["head_lr"] / recipe["lr"]
    # the backbone takes --optimizer.lr, the head keeps its ratio to it; StepLR (gamma 0.1) stepped each epoch
    assert sorted({round(g["initial_lr"], 8) for g in optimizer.param_groups})[:2] == sorted(
        {0.01, round(0.01 * head_ratio, 8)})[:2]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.1**2)
    config = cli.trainer.lr_scheduler_configs[0]
    assert isinstance(config.scheduler, torch.optim.lr_scheduler.StepLR) and config.interval == "epoch"

    # without --lr_scheduler the time-budget cosine stays the schedule (stepped every batch)
    default = run_lightning_cli(["fit", *small, "--trainer.max_epochs=1", "--optimizer", "torch.optim.SGD"])
    assert isinstance(default.trainer.optimizers[0], torch.optim.SGD)
    assert isinstance(default.trainer.lr_scheduler_configs[0].scheduler, torch.optim.lr_scheduler.LambdaLR)
    assert default.trainer.lr_scheduler_configs[0].interval == "step"

    ckpt = sorted((run / "checkpoints").glob("*.ckpt"))[-1]
    assert main(["predict", *small, "--ckpt_path", str(ckpt)]) == 0
    rows, vectors, fingerprint = read_shards(run / "predictions")
    assert sorted(rows["id"]) == sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
    assert rows["content_hash"].str.len().eq(64).all()
    bundle = ModelBundle.load(run / "predictions" / "bundle")
    assert fingerprint["bundle_id"] == bundle.card.bundle_id
    # the shards hold the checkpoint's embeddings: the exported bundle gives the same vectors
    sample = rows.head(4)
    again = bundle.embed([str(data / p) for p in sample["id"]])
    np.testing.assert_allclose(again, vectors[:4], atol=1e-4)


def test_class_loss_sizes_left_out_come_from_the_data_and_a_wrong_one_is_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_image_folder(tmp_path / "imgs", n_classes=4, per_class=8, size=32)
    monkeypatch.chdir(tmp_path)
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["model"]["loss"] = {"class_path": "pytorch_metric_learning.losses.ArcFaceLoss",
                               "init_args": {"margin": 28.6}}  # num_classes and embedding_size left out
    recipe["model"].pop("miner", None)
    config = tmp_path / "arcface.yaml"
    config.write_text(yaml.safe_dump(recipe))
    args = [a.removeprefix("--") for a in _overrides(data, tmp_path / "run", config)[2:]]
    training = build_training(config, args)
    training.module.fit_to_classes(4)
    assert tuple(training.module.loss_fn.W.shape) == (16, 4)
    assert main(["fit", *_overrides(data, tmp_path / "run", config), "--model.loss.init_args.num_classes=7"]) == 2
    err = capsys.readouterr().err.strip()
    assert "num_classes=7" in err and "4 classes" in err and "\n" not in err
    with pytest.raises(DataError, match=r"cannot build pytorch_metric_learning\.losses\.ArcFaceLoss"):
        build_training(config, [*args, "model.loss.init_args.margin=abc"])
