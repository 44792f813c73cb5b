"""deepfeat.finetune.data readers and contract: the way back to Hugging Face pictures, OML blanks, file errors."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from deepfeat.connectors.schema import user_fields
from deepfeat.finetune.data.contract import check_record_files, file_kind, validate_records
from deepfeat.finetune.data.images import load_image
from deepfeat.finetune.data.readers import (
    HF_DATASET_COLUMN,
    HF_IMAGE_COLUMN,
    HF_ROW_COLUMN,
    read_hf_image,
    read_image_folder,
    read_manifest,
    read_records,
)
from deepfeat.finetune.errors import DataError

WAY_BACK = [HF_DATASET_COLUMN, HF_ROW_COLUMN, HF_IMAGE_COLUMN]


def _png(value: int, size: int = 6) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _saved_dataset_dict(folder: Path, *, image_column: str = "image") -> Path:
    """A DatasetDict with its own train and test splits (distinct pixels per row), saved to ``folder``."""
    import datasets

    def part(n: int, offset: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {
                image_column: [{"bytes": _png(offset + 5 * i), "path": None} for i in range(n)],
                "label": [i % 3 for i in range(n)],
            },
            features=datasets.Features(
                {image_column: datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])}
            ),
        )

    datasets.DatasetDict({"train": part(9, 0), "test": part(6, 100)}).save_to_disk(str(folder))
    return folder


# --------------------------------------------------------------------------------------------------
# Hugging Face: the pictures stay reachable, the splits stay the dataset's own


def test_saved_dataset_dict_keeps_its_splits_and_a_way_back_to_each_picture(tmp_path: Path) -> None:
    folder = _saved_dataset_dict(tmp_path / "hf")
    df = read_records(folder)
    assert df.groupby("split").size().to_dict() == {"test": 6, "train": 9}  # not re-split
    assert df["path"].isna().all() and df["image"].map(lambda v: isinstance(v, bytes)).all()
    test_rows = df[df["split"] == "test"]
    assert set(test_rows[HF_DATASET_COLUMN]) == {str(folder.absolute() / "test")}
    assert test_rows[HF_ROW_COLUMN].tolist() == list(range(6))
    for _, record in df.sample(5, random_state=0).iterrows():
        back = read_hf_image(record[HF_DATASET_COLUMN], record[HF_ROW_COLUMN], record[HF_IMAGE_COLUMN])
        assert back == record["image"]  # the very bytes the record was embedded from
    assert load_image(read_hf_image(folder / "test", 3))[0, 0, 0] == 115


def test_the_way_back_reaches_milvus_fields_and_the_image_column_does_not(tmp_path: Path) -> None:
    df = read_records(_saved_dataset_dict(tmp_path / "hf", image_column="picture"), image_column="picture")
    fields = {f.name: f.dtype for f in user_fields(df)}
    assert fields[HF_DATASET_COLUMN] == "VARCHAR" and fields[HF_ROW_COLUMN] == "INT64"
    assert fields[HF_IMAGE_COLUMN] == "VARCHAR" and set(df[HF_IMAGE_COLUMN]) == {"picture"}
    assert "image" not in fields  # bytes are never a Milvus field: the display needs the way back


def test_read_hf_image_errors_say_what_changed(tmp_path: Path) -> None:
    folder = _saved_dataset_dict(tmp_path / "hf")
    with pytest.raises(DataError, match=r"row 6 is outside .*\(6 rows\)"):
        read_hf_image(folder / "test", 6)
    with pytest.raises(DataError, match=r"no column 'pixels'"):
        read_hf_image(folder / "test", 0, "pixels")
    with pytest.raises(DataError, match=r"no state\.json"):
        read_hf_image(tmp_path / "moved-away", 0)


def test_dataset_dict_splits_survive_the_data_module(tmp_path: Path) -> None:
    from deepfeat.finetune.training.datamodule import RetrievalDataModule

    df = read_records(_saved_dataset_dict(tmp_path / "hf"))
    test_ids = set(df.loc[df["split"] == "test", "id"])
    records = RetrievalDataModule.from_records(df, val_fraction=0.0).records
    assert records.groupby("split").size().to_dict() == {"test": 6, "train": 9}
    assert set(records.loc[records["split"] == "test", "id"]) == test_ids
    # the default as_is mode only draws a val split from train (the dict has none); its test split stays
    records = RetrievalDataModule.from_records(df, val_fraction=0.34).records
    assert set(records.loc[records["split"] == "test", "id"]) == test_ids
    assert records["split"].value_counts().to_dict() == {"test": 6, "train": 6, "val": 3}


# --------------------------------------------------------------------------------------------------
# OML manifests: blank query/gallery flags on train rows


def test_blank_flags_are_false_on_train_rows(tmp_path: Path) -> None:
    for name in ("a", "b", "c", "d"):
        (tmp_path / f"{name}.png").write_bytes(_png(1))
    manifest = tmp_path / "oml.csv"
    manifest.write_text(
        "path,label,split,is_query,is_gallery\n"
        "a.png,x,train,,\n"
        "b.png,x,train,,\n"
        "c.png,x,validation,True,True\n"
        "d.png,x,validation,False,True\n"
    )
    df = read_manifest(manifest)
    assert df["is_query"].tolist() == [False, False, True, False]
    assert df["is_gallery"].tolist() == [False, False, True, True]
    parquet = pd.DataFrame(
        {"id": ["p", "q"], "image": [_png(1), _png(2)], "label": ["x", "x"], "is_query": [None, None]}
    )
    assert validate_records(parquet, check_files=False)["is_query"].tolist() == [False, False]


def test_blank_flags_are_refused_on_evaluation_rows(tmp_path: Path) -> None:
    raw = pd.DataFrame(
        {
            "id": ["a", "b", "c"],
            "image": [_png(1)] * 3,
            "label": ["x"] * 3,
            "split": ["train", "test", "test"],
            "is_query": ["", "", "true"],
        }
    )
    with pytest.raises(DataError, match=r"is_query is blank on 1 val/test row\(s\), e\.g\. ids \['b'\]"):
        validate_records(raw, check_files=False)


# --------------------------------------------------------------------------------------------------
# file errors that say what the file is, and where relative paths were looked for


def test_a_fifo_is_called_a_fifo_not_missing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "ok.png").write_bytes(_png(1))
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "folder.png").mkdir()
    raw = pd.DataFrame({"path": ["ok.png", "pipe.png", "folder.png", "gone.png"], "label": ["a"] * 4})
    with pytest.raises(DataError) as caught:
        validate_records(raw, root=tmp_path)  # returns at once: a FIFO is never opened
    message = str(caught.value)
    assert "3 of 4 image file(s) cannot be read as image files" in message
    assert "1 FIFO(s) (named pipes), not regular files, e.g. [" in message and "pipe.png" in message
    assert "1 folder(s), not image files" in message and "1 missing, e.g. [" in message
    assert file_kind(tmp_path / "pipe.png") == "a FIFO (named pipe)"
    assert file_kind(tmp_path / "ok.png") == "a regular file"
    with pytest.raises(DataError, match=r"is a FIFO \(named pipe\), neither a manifest nor a folder"):
        read_records(tmp_path / "pipe.png")
    with pytest.raises(DataError, match=r"is a FIFO \(named pipe\), not a CSV/Parquet file"):
        read_manifest(tmp_path / "pipe.png")
    with pytest.raises(DataError, match=r"is a FIFO \(named pipe\), not a folder"):
        read_image_folder(tmp_path / "pipe.png")


def test_manifest_errors_name_the_folder_paths_were_resolved_against(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "m.csv").write_text("path,label\nimgs/gone.png,a\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(DataError) as caught:
        read_manifest(Path("..") / "data" / "m.csv")
    message = str(caught.value)
    assert f"resolved against the manifest's folder {str(tmp_path / 'data')!r}" in message
    assert "working folder" not in message and str(tmp_path / "data" / "imgs" / "gone.png") in message
    with pytest.raises(DataError, match=r"resolved against the data root .*'/.*data'"):
        read_manifest(tmp_path / "data" / "m.csv", root=tmp_path / "data")


def test_plain_tables_name_the_working_folder_only_for_relative_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    relative = validate_records(pd.DataFrame({"path": ["gone.png"], "label": ["a"]}), check_files=False)
    with pytest.raises(DataError, match=rf"read from the working folder {str(tmp_path)!r}"):
        check_record_files(relative)
    absolute = validate_records(pd.DataFrame({"path": [str(tmp_path / "gone.png")], "label": ["a"]}), check_files=False)
    with pytest.raises(DataError) as caught:
        check_record_files(absolute)
    assert "working folder" not in str(caught.value) and "1 missing" in str(caught.value)


def test_reader_logs_come_from_their_own_modules(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "a.png").write_bytes(_png(1))
    (tmp_path / "loose.png").write_bytes(_png(1))
    with caplog.at_level(logging.WARNING, logger="deepfeat.finetune.data"):
        read_image_folder(tmp_path)
    names = {r.name for r in caplog.records}
    assert names == {"deepfeat.finetune.data.readers.folder", "deepfeat.finetune.data.contract"}
