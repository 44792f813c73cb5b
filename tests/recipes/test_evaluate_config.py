"""``deepfeat evaluate --config`` checks every key of its YAML (issue 22, class 2 "config typos are ignored"): a
misspelt key under ``model:``, ``trainer:``, ``data:`` or ``recipe:`` is refused in one line naming the nearest valid
key (exit 2), before any model, data module or trainer is built."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepfeat.finetune.errors import DataError
from deepfeat.recipes.cli import main
from deepfeat.recipes.config import CONFIG_DIR, check_config


def _evaluate(config: Path | str, tmp_path: Path) -> list[str]:
    # the bundle does not exist: a config refused first proves nothing was loaded or built before the check
    return ["evaluate", "--config", str(config), "--bundle", str(tmp_path / "no-bundle"), "--data",
            str(tmp_path / "no-data"), "--num-workers", "0", "--baseline-weights", "none"]


@pytest.mark.parametrize(("section", "typo", "nearest"), [
    ("model", "imag_size: 32", "model.image_size"),
    ("trainer", "max_epoch: 3", "trainer.max_epochs"),
    ("data", "split_mod: as_is", "data.split_mode"),
])
def test_a_misspelt_key_in_any_section_is_refused_with_the_nearest_name(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], section: str, typo: str, nearest: str) -> None:
    config = tmp_path / "mine.yaml"
    others = "" if section == "data" else f"data:\n  split_mode: as_is\n{section}:\n"
    config.write_text(f"{others}  {typo}\n" if others else f"data:\n  {typo}\n")
    assert main(_evaluate(config, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    wrong = f"{section}.{typo.split(':')[0]}"
    assert f"unknown key {wrong!r}" in err and f"did you mean {nearest!r}" in err and str(config) in err
    assert "no-bundle" not in err  # refused before the bundle was opened


def test_a_misspelt_recipe_key_of_a_recipe_yaml_is_refused(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    text = (CONFIG_DIR / "fashion.yaml").read_text()
    assert "  search:\n" in text
    config = tmp_path / "fashion-typo.yaml"
    config.write_text(text.replace("  search:\n", "  search:\n    top_kk: 3\n", 1))
    assert main(_evaluate(config, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "unknown key 'recipe.search.top_kk'" in err and "did you mean 'recipe.search.top_k'" in err


def test_a_wrong_value_and_a_wrong_section_name_are_refused(tmp_path: Path) -> None:
    bad_value = tmp_path / "value.yaml"
    bad_value.write_text("data:\n  split_mode: sideways\n")
    with pytest.raises(DataError, match=r"data\.split_mode"):
        check_config(bad_value)
    bad_section = tmp_path / "section.yaml"
    bad_section.write_text("modle:\n  image_size: 32\n")
    with pytest.raises(DataError, match=r"unknown key 'modle.image_size'; did you mean 'model.image_size'"):
        check_config(bad_section)


def test_valid_configs_pass_the_check_and_evaluate_goes_on(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    plain = tmp_path / "plain.yaml"  # a training config without a recipe: section
    plain.write_text("data:\n  split_mode: as_is\nmodel:\n  image_size: 32\ntrainer:\n  max_epochs: 1\n")
    assert check_config(plain) == plain
    assert check_config("fashion") == CONFIG_DIR / "fashion.yaml"
    # past the check, evaluate reaches the next step: the missing bundle is what it reports
    assert main(_evaluate(plain, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "no-bundle" in err and "unknown key" not in err
