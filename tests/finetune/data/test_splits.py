"""Open-set validation (``data.val_mode``): held-out splits disjoint as promised, refusals in one line."""

from __future__ import annotations

import pandas as pd
import pytest

from deepfeat.finetune.data.contract import validate_records
from deepfeat.finetune.data.splits import VAL_MODES, hold_out
from deepfeat.finetune.errors import DataError
from deepfeat.finetune.training.datamodule import RetrievalDataModule, check_measurable
from deepfeat.recipes.config import load_recipe


def _records(n_classes: int = 8, groups_per_class: int = 6, per_group: int = 3, split: str = "train") -> pd.DataFrame:
    """Generated records: classes x groups (products, patients) x images, all in one split (no files needed)."""
    rows = [{"id": f"c{c}-g{g}-i{i}", "path": f"/nonexistent/c{c}/g{g}/{i}.png", "label": f"c{c}",
             "group": f"c{c}-g{g}", "split": split}
            for c in range(n_classes) for g in range(groups_per_class) for i in range(per_group)]
    return validate_records(pd.DataFrame(rows), check_files=False)


def _parts(df: pd.DataFrame, split: str) -> pd.DataFrame:
    return df[df["split"] == split]


def _overlap(df: pd.DataFrame, column: str, a: str = "train", b: str = "val") -> set[str]:
    return set(_parts(df, a)[column]) & set(_parts(df, b)[column])


def test_unseen_classes_holds_out_whole_classes() -> None:
    out = hold_out(_records(), 0.25, "unseen_classes", seed=3)
    assert not _overlap(out, "label") and not _overlap(out, "group")
    assert _parts(out, "val")["label"].nunique() == 2 and _parts(out, "train")["label"].nunique() == 6
    assert len(out) == len(_records())  # rows moved, none lost
    # at least 2 classes even for a small fraction: a split of one class cannot measure retrieval
    assert _parts(hold_out(_records(), 0.01, "unseen_classes"), "val")["label"].nunique() == 2


def test_unseen_groups_holds_out_whole_groups_of_every_class() -> None:
    out = hold_out(_records(), 0.34, "unseen_groups", seed=1)
    assert not _overlap(out, "group") and not _overlap(out, "id")
    assert set(_parts(out, "val")["label"]) == set(_parts(out, "train")["label"]) == set(_records()["label"])
    assert 0.2 < (out["split"] == "val").mean() < 0.45


def test_same_classes_splits_images_and_ignores_groups() -> None:
    out = hold_out(_records(groups_per_class=2, per_group=12), 0.3, "same_classes", seed=0)
    assert not _overlap(out, "id")
    assert set(_parts(out, "val")["label"]) == set(_parts(out, "train")["label"])
    assert _overlap(out, "group")  # images of one product on both sides: new photos of known items


def test_hold_out_is_deterministic_and_leaves_other_splits_alone() -> None:
    df = pd.concat([_records(), _records(split="test").assign(id=lambda d: "t-" + d["id"],
                                                              group=lambda d: "t-" + d["group"])],
                   ignore_index=True)
    for mode in VAL_MODES:
        a, b = hold_out(df, 0.3, mode, seed=5), hold_out(df, 0.3, mode, seed=5)
        assert a["split"].tolist() == b["split"].tolist()
        assert (a.loc[df["split"] == "test", "split"] == "test").all()
        assert set(a["split"]) == {"train", "val", "test"}


@pytest.mark.parametrize(("split_mode", "val_mode"), [("by_class", "unseen_groups"), ("by_group", "unseen_classes"),
                                                      ("by_group", "same_classes"), ("by_class", "unseen_classes")])
def test_data_module_carves_test_by_split_mode_and_val_by_val_mode(split_mode: str, val_mode: str) -> None:
    dm = RetrievalDataModule.from_records(_records(n_classes=10), split_mode=split_mode, val_mode=val_mode,
                                          fractions=(0.6, 0.2, 0.2), seed=2)
    df = dm.records
    assert set(df["split"]) == {"train", "val", "test"}
    test_vs_train = "label" if split_mode == "by_class" else "group"
    assert not _overlap(df, test_vs_train, "train", "test") and not _overlap(df, test_vs_train, "val", "test")
    if val_mode == "unseen_classes":
        assert not _overlap(df, "label")
    elif val_mode == "unseen_groups":
        assert not _overlap(df, "group") and set(_parts(df, "val")["label"]) <= set(_parts(df, "train")["label"])
    else:
        assert not _overlap(df, "id") and set(_parts(df, "val")["label"]) <= set(_parts(df, "train")["label"])
    for split in ("val", "test"):  # every held-out image is a query and a gallery item (all_vs_all)
        assert _parts(df, split)["is_query"].all() and _parts(df, split)["is_gallery"].all()
        check_measurable(df, split)


def test_as_is_keeps_the_test_split_and_holds_val_out_of_train() -> None:
    records = pd.concat([_records(n_classes=6), _records(n_classes=6, split="test").assign(
        id=lambda d: "t-" + d["id"], group=lambda d: "t-" + d["group"])], ignore_index=True)
    dm = RetrievalDataModule.from_records(records, split_mode="as_is", val_mode="unseen_classes", val_fraction=0.3)
    df = dm.records
    assert (df.loc[df["id"].str.startswith("t-"), "split"] == "test").all()
    assert not _overlap(df, "label") and _parts(df, "val")["label"].nunique() == 2
    # the default (no val_mode) holds out whole groups, as before
    default = RetrievalDataModule.from_records(records, split_mode="as_is", val_fraction=0.3).records
    assert not _overlap(default, "group") and (default["split"] == "val").any()


def test_auto_validates_on_unseen_classes_only_when_the_test_split_has_new_classes() -> None:
    train = _records(n_classes=6)
    every = _records(n_classes=10, split="test")
    new_classes = every[every["label"].isin({f"c{i}" for i in range(6, 10)})]
    same_classes = _records(n_classes=6, split="test")
    for test, expected in ((new_classes, "unseen_classes"), (same_classes, "unseen_groups")):
        test = test.assign(id=lambda d: "t-" + d["id"], group=lambda d: "t-" + d["group"])
        records = pd.concat([train, test], ignore_index=True)
        auto = RetrievalDataModule.from_records(records, split_mode="as_is", val_mode="auto", val_fraction=0.3,
                                                seed=1).records
        explicit = RetrievalDataModule.from_records(records, split_mode="as_is", val_mode=expected,
                                                    val_fraction=0.3, seed=1).records
        pd.testing.assert_frame_equal(auto, explicit)  # the same carving as the mode it resolves to
        assert (auto.loc[auto["id"].str.startswith("t-"), "split"] == "test").all()
        if expected == "unseen_classes":
            assert not _overlap(auto, "label") and _parts(auto, "val")["label"].nunique() == 2
        else:
            assert set(_parts(auto, "val")["label"]) <= set(_parts(auto, "train")["label"])
    # with split_mode by_group / by_class the test split is carved as they say, and auto is their default
    for split_mode in ("by_group", "by_class"):
        auto = RetrievalDataModule.from_records(train, split_mode=split_mode, val_mode="auto", seed=3).records
        default = RetrievalDataModule.from_records(train, split_mode=split_mode, seed=3).records
        pd.testing.assert_frame_equal(auto, default)


def test_refusals_are_one_line_with_the_counts_and_the_fix() -> None:
    with pytest.raises(DataError) as exc:
        hold_out(_records(n_classes=3), 0.2, "unseen_classes")
    message = str(exc.value)
    assert "\n" not in message and "3 class(es)" in message and "unseen_groups" in message
    with pytest.raises(DataError, match=r"val_mode must be one of"):
        hold_out(_records(), 0.2, "unseen_things")  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"\(0, 1\)"):
        hold_out(_records(), 1.0, "unseen_groups")
    # a validation split of one class is refused before training, naming the split and its counts
    one = hold_out(_records(n_classes=4), 0.25, "unseen_classes")
    one.loc[one["split"] == "val", "label"] = "c0"
    with pytest.raises(DataError) as exc:
        check_measurable(one, "val")
    message = str(exc.value)
    assert "\n" not in message and "'val'" in message and "1 class(es)" in message and "2+ classes" in message


def test_recipe_yaml_refuses_an_unknown_val_mode() -> None:
    with pytest.raises(DataError, match="val_mode"):
        load_recipe("fashion", ["data.val_mode=unseen_products"])
    config = load_recipe("medical", ["model.backbone=test_efficientnet", "model.weights=none"])
    assert config.training.datamodule.hparams["val_mode"] == "unseen_groups"
    fashion = load_recipe("fashion", ["model.backbone=test_efficientnet", "model.weights=none"])
    assert fashion.training.datamodule.hparams["val_mode"] == "auto"
