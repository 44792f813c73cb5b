"""Recipe YAMLs and their glue: every shipped recipe is a complete LightningCLI config plus a `recipe:` section."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from deepfeat.connectors.schema import IndexSpec
from deepfeat.finetune.errors import DataError
from deepfeat.recipes.cli import main
from deepfeat.recipes.recipes import (
    RECIPES,
    apply_overrides,
    build_filter,
    instantiate,
    list_recipes,
    load_recipe,
    milvus_literal,
    pick_queries,
)

NAMES = ["classify", "cluster", "dedup", "fashion", "medical"]


def test_every_recipe_is_listed_with_a_description() -> None:
    recipes = list_recipes()
    assert [r.name for r in recipes] == NAMES == sorted(RECIPES)
    assert all(len(r.description) > 30 and r.path.is_file() for r in recipes)


@pytest.mark.parametrize("name", NAMES)
def test_recipe_parts_build(name: str) -> None:
    config = load_recipe(name)
    settings = config.settings()
    # the guarded path trains like `deepfeat fit` would: freezing, patience and EMA come from the callbacks
    assert settings.freeze_epochs == 1 and settings.patience == 3 and settings.ema_decay == 0.99
    assert settings.preset == config.section("data")["preset"] and settings.guard
    assert config.loss() is not None  # spelt out in the YAML, built from class_path/init_args
    IndexSpec.parse(config.collection.index)  # the index spec is valid
    assert config.collection.name == name and config.collection.key == "record_id"
    assert set(config.data_kwargs()) <= {
        "split_mode",
        "fractions",
        "val_fraction",
        "classes",
        "limit_per_class",
        "query_mode",
    }
    assert config.data_kwargs()["split_mode"] == "by_group"


def test_flip_tta_and_whitening_come_from_the_export_callback() -> None:
    config = load_recipe("fashion")
    assert not config.settings().flip_tta and not config.settings().whiten
    export = next(c for c in config.raw["trainer"]["callbacks"] if c["class_path"].endswith(".ExportBundle"))
    export["init_args"].update(flip_tta=True, whiten=True, whiten_regs=[0.03, 0.3])
    settings = config.settings()
    assert settings.flip_tta and settings.whiten and settings.whiten_regs == (0.03, 0.3)


def test_training_only_model_keys_reach_the_guarded_path() -> None:
    config = load_recipe("fashion")
    config.raw["model"].update(progressive_size=48, progressive_fraction=0.4, drop_path_rate=0.1)
    settings = config.settings()
    assert (settings.progressive_size, settings.progressive_fraction, settings.drop_path_rate) == (48, 0.4, 0.1)


def test_medical_recipe_is_patient_level() -> None:
    config = load_recipe("medical")
    settings = config.settings()
    assert settings.exclude_same_group and settings.preset == "medical"
    assert config.action["same_fields"] == ["modality", "body_part"]
    loss, miner = config.loss(), config.miner()
    assert type(loss).__name__ == "TripletMarginLoss" and type(loss.distance).__name__ == "CosineSimilarity"
    assert type(miner).__name__ == "TripletMarginMiner" and miner.type_of_triplets == "semihard"


@pytest.mark.parametrize("name", ["medical", "classify"])
def test_lightning_cli_reads_the_same_yaml(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One config system: `deepfeat fit --config` accepts a recipe YAML and builds the same loss and miner."""
    from deepfeat.finetune.training.config import DeepfeatCLI
    from deepfeat.finetune.training.datamodule import RetrievalDataModule
    from deepfeat.finetune.training.module import MetricLearningModule

    monkeypatch.setattr(sys, "argv", ["deepfeat"])
    config = load_recipe(name)
    path = config.path
    cli = DeepfeatCLI(
        MetricLearningModule,
        RetrievalDataModule,
        run=False,
        auto_configure_optimizers=False,
        args=[
            "--config",
            str(path),
            "--model.backbone=test_efficientnet",
            "--model.weights=none",
            "--model.image_size=32",
            "--trainer.logger=false",
        ],
    )
    assert type(cli.model.loss_fn) is type(config.loss())
    assert type(cli.model.miner) is type(config.miner())
    assert cli.config["recipe"]["name"] == name
    # deepfeat fit chooses the whitening patient-aware where the guarded path does
    from deepfeat.finetune.training.callbacks import ExportBundle

    export = next(c for c in cli.trainer.callbacks if isinstance(c, ExportBundle))
    assert export.exclude_same_group == config.settings().exclude_same_group


def test_overrides_parse_yaml_values_and_refuse_unknown_sections() -> None:
    raw = {"model": {"image_size": 64}, "recipe": {"search": {"top_k": 5}}}
    out = apply_overrides(
        raw, ["model.image_size=32", "recipe.search.filter=price <= 80", "recipe.search.top_k=3", "model.layers=[1, 2]"]
    )
    assert out["model"] == {"image_size": 32, "layers": [1, 2]}
    assert out["recipe"]["search"] == {"top_k": 3, "filter": "price <= 80"}
    assert raw["model"]["image_size"] == 64  # the input is not changed
    with pytest.raises(DataError, match="'modle' is not a section"):
        apply_overrides(raw, ["modle.image_size=32"])
    with pytest.raises(DataError, match="not key=value"):
        apply_overrides(raw, ["model.image_size"])
    with pytest.raises(DataError, match="unknown key"):
        load_recipe("fashion", ["recipe.finetune.gaurd=false"]).settings()


def test_instantiate_builds_nested_class_paths_and_explains_failures() -> None:
    loss = instantiate(
        {
            "class_path": "pytorch_metric_learning.losses.ContrastiveLoss",
            "init_args": {
                "pos_margin": 0.9,
                "distance": {"class_path": "pytorch_metric_learning.distances.CosineSimilarity"},
            },
        }
    )
    assert loss.pos_margin == 0.9 and type(loss.distance).__name__ == "CosineSimilarity"
    with pytest.raises(DataError, match="cannot be imported"):
        instantiate({"class_path": "pytorch_metric_learning.losses.NoSuchLoss"})
    with pytest.raises(DataError, match="refused init_args"):
        instantiate({"class_path": "pytorch_metric_learning.losses.ContrastiveLoss", "init_args": {"margin": 1}})


def test_filters_quote_values_safely() -> None:
    assert milvus_literal('PAT"7\\x') == '"PAT\\"7\\\\x"'
    assert milvus_literal(3) == "3" and milvus_literal(2.5) == "2.5" and milvus_literal(True) == "true"
    expr = build_filter(
        "split != 'x'", equals={"label": 'a"b'}, not_equals={"group": "p1"}, ranges={"price": (10, None)}
    )
    assert expr == '(split != \'x\') and label == "a\\"b" and group != "p1" and price >= 10.0'
    assert build_filter(None) is None
    assert milvus_literal("Müller") == '"Müller"'  # non-ASCII stays as it is (Milvus refuses \u escapes)
    with pytest.raises(DataError, match="control character"):
        milvus_literal("a\x01b")


def test_pick_queries_spreads_over_classes_one_per_group() -> None:
    import pandas as pd

    records = pd.DataFrame(
        {
            "id": [f"r{i}" for i in range(12)],
            "label": ["a", "b", "c"] * 4,
            "group": [f"g{i // 2}" for i in range(12)],
            "split": "test",
            "is_query": True,
        }
    )
    picks = pick_queries(records, 3)
    assert sorted(picks["label"]) == ["a", "b", "c"] and picks["group"].is_unique


def test_cli_lists_shows_and_explains(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["recipe", "list"]) == 0
    out = capsys.readouterr().out
    for name in NAMES:
        assert f"\n{name} " in f"\n{out}"
    assert main(["recipe", "show", "dedup", "--set", "recipe.dedup.threshold=0.8"]) == 0
    assert "threshold: 0.8" in capsys.readouterr().out
    assert main(["recipe", "run", "nosuch", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'nosuch'" in err and "fashion" in err and "Traceback" not in err
    assert main(["recipe", "run", "medical", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err
