"""Recipe YAMLs and their glue: every shipped recipe is a complete LightningCLI config plus a `recipe:` section."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from deepfeat.connectors.query import build_filter, milvus_literal
from deepfeat.connectors.schema import IndexSpec
from deepfeat.finetune.errors import DataError
from deepfeat.finetune.training import EMA, ExportBundle, MetricLearningModule, RetrievalDataModule
from deepfeat.recipes.cli import main
from deepfeat.recipes.config import RECIPES, RecipeConfig, list_recipes, load_recipe, resolve_config
from deepfeat.recipes.recipes import pick_queries

NAMES = ["classify", "cluster", "dedup", "fashion", "medical", "quickstart"]
TINY = ["model.backbone=test_efficientnet", "model.weights=none", "model.image_size=32"]


def test_every_recipe_is_listed_with_a_description() -> None:
    recipes = list_recipes()
    assert [r.name for r in recipes] == NAMES == sorted(RECIPES)
    assert all(len(r.description) > 30 and r.path.is_file() for r in recipes)


def _callbacks(config: RecipeConfig) -> dict[str, Any]:
    return {type(c).__name__: c for c in config.training.trainer.callbacks}


@pytest.mark.parametrize("name", NAMES)
def test_recipe_yaml_builds_the_real_objects(name: str) -> None:
    """One config system: the YAML is parsed once into the module, data module and trainer the run drives."""
    config = load_recipe(name, TINY)
    training = config.training
    assert isinstance(training.module, MetricLearningModule) and isinstance(training.datamodule, RetrievalDataModule)
    cbs = _callbacks(config)
    # the guarded path trains like `deepfeat fit`: freezing, patience, EMA and the guard are callbacks
    # fashion trains the backbone from the first step (CosFace proxies at their own lr; see its YAML)
    assert name == "fashion" or cbs["FreezeBackbone"].epochs == 1
    assert cbs["EarlyStopping"].patience == 3
    assert isinstance(cbs["EMA"], EMA) and cbs["EMA"].decay == 0.99
    assert isinstance(cbs["ExportBundle"], ExportBundle) and cbs["ExportBundle"].guard
    assert training.module.hparams["max_minutes"] > 0  # the budget is the module's, read by schedule and stop
    assert training.datamodule.hparams["preset"] == config.section("data")["preset"]
    assert training.module.loss_fn is not None  # spelt out in the YAML, built from class_path/init_args
    IndexSpec.parse(config.collection.index)  # the index spec is valid
    assert config.collection.name == name and config.collection.key == "record_id"
    expected = "as_is" if name == "quickstart" else "by_group"
    assert training.datamodule.hparams["split_mode"] == expected


def test_overrides_accumulate_and_typos_are_refused_with_the_key(tmp_path: Path) -> None:
    config = load_recipe("fashion", [*TINY, "model.embedding_dim=16", "recipe.search.top_k=3",
                                     "recipe.search.filter=price <= 80", "model.layers=[1, 2]"])
    assert config.training.module.model.embedding_dim == 16 and config.training.module.hparams["layers"] == [1, 2]
    assert config.search["top_k"] == 3 and config.search["filter"] == "price <= 80"
    with pytest.raises(DataError, match="imag_size"):
        load_recipe("fashion", ["model.imag_size=32"])
    with pytest.raises(DataError, match="not key=value"):
        load_recipe("fashion", ["model.image_size"])
    with pytest.raises(DataError, match="gaurd"):
        load_recipe("fashion", ["recipe.collection.gaurd=false"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(load_recipe_path("fashion").read_text().replace("  max_epochs:", "  max_epoch:"))
    with pytest.raises(DataError, match="max_epoch"):
        load_recipe(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(DataError, match="not valid YAML"):
        load_recipe(broken)


def load_recipe_path(name: str) -> Path:
    return Path(RECIPES and list_recipes()[[r.name for r in list_recipes()].index(name)].path)


def test_medical_recipe_is_patient_level() -> None:
    config = load_recipe("medical", TINY)
    assert _callbacks(config)["ExportBundle"].exclude_same_group
    assert config.training.datamodule.hparams["preset"] == "medical"
    assert config.action["same_fields"] == ["modality", "body_part"]
    loss, miner = config.training.module.loss_fn, config.training.module.miner
    assert type(loss).__name__ == "TripletMarginLoss" and type(loss.distance).__name__ == "CosineSimilarity"
    assert type(miner).__name__ == "TripletMarginMiner" and miner.type_of_triplets == "semihard"


@pytest.mark.parametrize("name", ["medical", "classify"])
def test_lightning_cli_reads_the_same_yaml(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`deepfeat fit --config` accepts a recipe YAML and builds the same objects as `recipe run`."""
    from deepfeat.finetune.training.config import DeepfeatCLI

    monkeypatch.setattr(sys, "argv", ["deepfeat"])
    config = load_recipe(name, TINY)
    args = ["--config", str(config.path), *[f"--{o}" for o in TINY], "--trainer.logger=false"]
    cli = DeepfeatCLI(MetricLearningModule, RetrievalDataModule, run=False, auto_configure_optimizers=False, args=args)
    assert type(cli.model.loss_fn) is type(config.training.module.loss_fn)
    assert type(cli.model.miner) is type(config.training.module.miner)
    assert cli.config["recipe"]["name"] == name
    export = next(c for c in cli.trainer.callbacks if isinstance(c, ExportBundle))
    assert export.exclude_same_group == _callbacks(config)["ExportBundle"].exclude_same_group


def test_a_recipe_resolves_by_name_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_config("fashion") == resolve_config("fashion.yaml") == load_recipe_path("fashion")
    with pytest.raises(DataError, match="neither a file nor a shipped recipe"):
        resolve_config("nosuch")


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
    assert "'nosuch'" in err and "fashion" in err and "Traceback" not in err
    assert main(["recipe", "run", "medical", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err
