"""deepfeat.finetune.data: the record contract, the readers, splits and manifests."""

from __future__ import annotations

import gzip
import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from deepfeat.finetune.data.contract import RECORD_COLUMNS, check_retrievable, validate_records
from deepfeat.finetune.data.images import load_image
from deepfeat.finetune.data.readers import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    read_fashion_mnist,
    read_hf_dataset,
    read_image_folder,
    read_manifest,
    read_records,
)
from deepfeat.finetune.data.splits import assign_query_gallery, split_by_class, split_by_group
from deepfeat.finetune.data.writer import write_manifest
from deepfeat.finetune.errors import DataError

TINY_N_CLASSES, TINY_PER_CLASS = 6, 8  # the shape of the tiny_image_folder fixture (conftest.py)


def _png_bytes(value: int, size: int = 4) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _records(n_classes: int = 20, per_class: int = 6, **extra: Any) -> pd.DataFrame:
    """Validated in-memory records (tiny arrays, no files)."""
    rows = [
        {"id": f"c{c:02d}-{i}", "image": np.full((2, 2), c, dtype=np.uint8), "label": f"c{c:02d}"}
        for c in range(n_classes)
        for i in range(per_class)
    ]
    df = pd.DataFrame(rows)
    for column, value in extra.items():
        df[column] = value
    return validate_records(df, check_files=False)


# --------------------------------------------------------------------------------------------------
# image folders


def test_read_image_folder(tiny_image_folder: Path) -> None:
    df = read_image_folder(tiny_image_folder)
    assert list(df.columns) == list(RECORD_COLUMNS)
    assert len(df) == TINY_N_CLASSES * TINY_PER_CLASS
    assert sorted(df["label"].unique()) == sorted(p.name for p in tiny_image_folder.iterdir())
    assert (df["label"].value_counts() == TINY_PER_CLASS).all()
    first = df.iloc[0]
    assert first["id"] == f"{first['label']}/00.png"
    assert Path(first["path"]).is_absolute() and Path(first["path"]).is_file()
    assert first["image"] is None
    assert (df["split"] == "train").all() and not df["is_query"].any() and not df["is_gallery"].any()
    assert (df["group"] == df["id"]).all()
    assert load_image(first["path"]).shape == (32, 32, 3)


def test_image_folder_skips_hidden_loose_and_foreign_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "data"
    for name in ("cat", "dog", ".cache"):
        (root / name).mkdir(parents=True)
    (root / "cat" / "a.PNG").write_bytes(_png_bytes(1))
    (root / "cat" / ".hidden.png").write_bytes(_png_bytes(2))
    (root / "cat" / "notes.txt").write_text("x")
    (root / "cat" / "nested" / "deeper").mkdir(parents=True)
    (root / "cat" / "nested" / "deeper" / "b.jpg").write_bytes(_png_bytes(3))
    (root / "dog" / "c.png").write_bytes(_png_bytes(4))
    (root / ".cache" / "d.png").write_bytes(_png_bytes(5))
    (root / "loose.png").write_bytes(_png_bytes(6))
    with caplog.at_level(logging.WARNING, logger="deepfeat.finetune.data"):
        df = read_image_folder(root)
    assert sorted(df["id"]) == ["cat/a.PNG", "cat/nested/deeper/b.jpg", "dog/c.png"]
    assert df.set_index("id").loc["cat/nested/deeper/b.jpg", "label"] == "cat"
    assert "loose.png" in caplog.text and "one sub-folder per class" in caplog.text
    assert "single image" in caplog.text  # dog has one image: retrieval needs two


def test_image_folder_keeps_odd_names_as_data(tmp_path: Path) -> None:
    label = 'café & co\'s "best" [1]'
    folder = tmp_path / "root" / label
    folder.mkdir(parents=True)
    names = ["with space.png", 'quote\'s "x".png', "日本語.png"]
    for i, name in enumerate(names):
        (folder / name).write_bytes(_png_bytes(i))
    df = read_image_folder(tmp_path / "root")
    assert sorted(df["id"]) == sorted(f"{label}/{name}" for name in names)
    assert set(df["label"]) == {label}
    assert all(Path(p).is_file() for p in df["path"])


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_image_folder(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(_png_bytes(0))
    with pytest.raises(DataError, match="not a folder"):
        read_image_folder(tmp_path / "file.png")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        read_image_folder(tmp_path / "empty")


def test_image_folder_reports_broken_links(tmp_path: Path) -> None:
    (tmp_path / "root" / "cls").mkdir(parents=True)
    (tmp_path / "root" / "cls" / "ok.png").write_bytes(_png_bytes(0))
    os.symlink(tmp_path / "gone.png", tmp_path / "root" / "cls" / "link.png")
    with pytest.raises(DataError, match="broken symbolic link"):
        read_image_folder(tmp_path / "root")


def test_image_folder_extensions(tiny_image_folder: Path) -> None:
    df = read_image_folder(tiny_image_folder, extensions=["png"])
    assert len(df) == TINY_N_CLASSES * TINY_PER_CLASS // 2
    assert df["id"].str.endswith(".png").all()


# --------------------------------------------------------------------------------------------------
# validation


def test_missing_columns_name_what_was_received_and_needed() -> None:
    with pytest.raises(DataError, match=r"missing required column\(s\): label.*received columns \['path'\]"):
        validate_records(pd.DataFrame({"path": ["a.png"]}), check_files=False)
    with pytest.raises(DataError, match="path or image"):
        validate_records(pd.DataFrame({"label": ["x"]}), check_files=False)
    with pytest.raises(DataError, match="id"):
        validate_records(pd.DataFrame({"image": [b"x"], "label": ["x"]}), check_files=False)
    with pytest.raises(DataError, match="empty"):
        validate_records(pd.DataFrame({"path": [], "label": []}), check_files=False)


def test_defaults_and_normalisation() -> None:
    raw = pd.DataFrame(
        {
            "path": ["a/1.png", "a/2.png", "b/3.png", "b/4.png"],
            "label": ["a", "a", "b", "b"],
            "split": [" Validation", "val", "TEST", "test"],
            "colour": ["red", "red", "blue", "blue"],
        }
    )
    df = validate_records(raw, check_files=False)
    assert list(df.columns) == [*RECORD_COLUMNS, "colour"]
    assert df["id"].tolist() == raw["path"].tolist()
    assert df["split"].tolist() == ["val", "val", "test", "test"]
    assert df["is_query"].all() and df["is_gallery"].all()  # all-vs-all in evaluation splits
    assert (df["group"] == df["id"]).all()
    assert df["image"].isna().all()
    assert list(raw.columns) == ["path", "label", "split", "colour"]  # input untouched


def test_mixed_label_types_are_merged_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    raw = pd.DataFrame({"id": ["a", "b", "c", "d"], "image": [b"x"] * 4, "label": [1, "1", 2.0, "cat"]})
    with caplog.at_level(logging.WARNING, logger="deepfeat.finetune.data.contract"):
        df = validate_records(raw, check_files=False)
    assert df["label"].tolist() == ["1", "1", "2", "cat"]
    assert "mix types" in caplog.text


def test_integer_labels_become_text_silently(caplog: pytest.LogCaptureFixture) -> None:
    raw = pd.DataFrame({"id": ["a", "b"], "image": [b"x", b"y"], "label": np.array([3, 3])})
    with caplog.at_level(logging.WARNING, logger="deepfeat.finetune.data.contract"):
        df = validate_records(raw, check_files=False)
    assert df["label"].tolist() == ["3", "3"]
    assert "mix types" not in caplog.text


def test_duplicate_ids_are_shown() -> None:
    raw = pd.DataFrame({"id": ["x", "y", "x", "z", "y"], "image": [b"1"] * 5, "label": ["a"] * 5})
    with pytest.raises(DataError, match=r"2 id\(s\) occur more than once, e\.g\. \['x', 'y'\]"):
        validate_records(raw, check_files=False)


def test_unknown_split_values_are_counted() -> None:
    raw = pd.DataFrame(
        {
            "id": ["a", "b", "c"],
            "image": [b"1"] * 3,
            "label": ["l"] * 3,
            "split": ["train", "holdout", "holdout"],
        }
    )
    with pytest.raises(DataError, match=r"\{'holdout': 2\}.*allowed: \['train', 'val', 'test'\]"):
        validate_records(raw, check_files=False)


def test_missing_files_are_counted(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(_png_bytes(0))
    raw = pd.DataFrame({"path": ["ok.png", "gone1.png", "gone2.png"], "label": ["a"] * 3})
    with pytest.raises(DataError, match=r"2 of 3 image file\(s\) cannot be found.*gone1\.png"):
        validate_records(raw, root=tmp_path)
    df = validate_records(raw, root=tmp_path, check_files=False)
    assert df["path"].tolist() == [str(tmp_path / n) for n in raw["path"]]  # joined to the root


def test_paths_may_not_leave_the_root(tmp_path: Path) -> None:
    for bad in ("../secret.png", "a/../../secret.png", "/etc/passwd"):
        raw = pd.DataFrame({"path": ["fine.png", bad], "label": ["a", "a"]})
        with pytest.raises(DataError, match="outside the data root"):
            validate_records(raw, root=tmp_path, check_files=False)
    inside = pd.DataFrame({"path": [str(tmp_path / "x.png"), "a/../y.png"], "label": ["a", "a"]})
    assert validate_records(inside, root=tmp_path, check_files=False)["path"].tolist() == [
        str(tmp_path / "x.png"),
        str(tmp_path / "y.png"),
    ]


def test_rows_without_path_or_image() -> None:
    raw = pd.DataFrame(
        {"id": ["a", "b"], "path": ["x.png", None], "image": [None, None], "label": ["l", "l"]}
    )
    with pytest.raises(DataError, match=r"1 row\(s\) have neither a path nor an in-memory image.*'b'"):
        validate_records(raw, check_files=False)


def test_groups_may_not_straddle_splits() -> None:
    raw = pd.DataFrame(
        {
            "id": ["a", "b", "c"],
            "image": [b"1"] * 3,
            "label": ["x"] * 3,
            "split": ["train", "test", "test"],
            "group": ["patient-1", "patient-1", "patient-2"],
        }
    )
    with pytest.raises(DataError, match=r"group\(s\) straddle splits.*patient-1.*split_by_group"):
        validate_records(raw, check_files=False)


def test_labels_and_booleans_are_checked() -> None:
    base = {"id": ["a", "b"], "image": [b"1", b"2"]}
    with pytest.raises(DataError, match="no label"):
        validate_records(pd.DataFrame({**base, "label": ["x", None]}), check_files=False)
    df = validate_records(
        pd.DataFrame({**base, "label": ["x", "x"], "is_query": ["yes", "0"], "is_gallery": [1, True]}),
        check_files=False,
    )
    assert df["is_query"].tolist() == [True, False] and df["is_gallery"].tolist() == [True, True]
    with pytest.raises(DataError, match="is_query must be true/false"):
        validate_records(
            pd.DataFrame({**base, "label": ["x", "x"], "is_query": ["maybe", "yes"]}), check_files=False
        )


def test_pil_images_in_memory_are_refused_with_a_hint() -> None:
    raw = pd.DataFrame({"id": ["a"], "image": [Image.new("RGB", (2, 2))], "label": ["x"]})
    with pytest.raises(DataError, match=r"np\.asarray\(img\.convert"):
        validate_records(raw, check_files=False)


def test_single_image_classes_and_missing_queries_warn(caplog: pytest.LogCaptureFixture) -> None:
    raw = pd.DataFrame(
        {
            "id": list("abc"),
            "image": [b"1"] * 3,
            "label": ["x", "x", "lonely"],
            "split": "val",
            "is_query": False,
        }
    )
    with caplog.at_level(logging.WARNING, logger="deepfeat.finetune.data.contract"):
        validate_records(raw, check_files=False)
    assert "1 of 2 class(es) in split 'val' have a single image" in caplog.text
    assert "split 'val' has no queries" in caplog.text


def test_check_retrievable() -> None:
    df = assign_query_gallery(_records(3, 4, split="val"), split="val")
    assert check_retrievable(df, "val") == 12
    holdout = assign_query_gallery(df, split="val", mode="holdout", query_fraction=0.25)
    assert check_retrievable(holdout, "val") == 3
    singles = _records(4, 1, split="val")
    with pytest.raises(DataError, match="no query in split 'val' has a positive"):
        check_retrievable(singles, "val")
    with pytest.raises(DataError, match="split 'test' has no records"):
        check_retrievable(df, "test")
    no_queries = df.assign(is_query=False)
    with pytest.raises(DataError, match="0 queries"):
        check_retrievable(no_queries, "val")


# --------------------------------------------------------------------------------------------------
# manifests


def test_csv_manifest_relative_to_its_folder(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "images" / name).write_bytes(_png_bytes(0))
    (tmp_path / "manifests").mkdir()
    manifest = tmp_path / "manifests" / "train.csv"
    manifest.write_text("path,label,split,site\n../images/a.png,NA,train,3\n../images/b.png,007,train,4\n")
    df = read_manifest(manifest)
    assert df["path"].tolist() == [str(tmp_path / "images" / "a.png"), str(tmp_path / "images" / "b.png")]
    assert df["id"].tolist() == ["../images/a.png", "../images/b.png"]
    assert df["label"].tolist() == ["NA", "007"]  # text stays text
    assert df["site"].tolist() == [3, 4]
    with pytest.raises(DataError, match="outside the data root"):
        read_manifest(manifest, root=tmp_path / "manifests")


def test_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(tmp_path / "nope.csv")
    (tmp_path / "m.json").write_text("{}")
    with pytest.raises(DataError, match=r"\.csv or \.parquet"):
        read_manifest(tmp_path / "m.json")
    (tmp_path / "m.csv").write_text("image,label\nx.png,a\n")
    with pytest.raises(DataError, match="rename it to 'path'"):
        read_manifest(tmp_path / "m.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="cannot read manifest"):
        read_manifest(tmp_path / "empty.csv")
    (tmp_path / "missing.csv").write_text("path,label\nnot-here.png,a\n")
    with pytest.raises(DataError, match="cannot be found"):
        read_manifest(tmp_path / "missing.csv")


def test_csv_round_trip(tiny_image_folder: Path, tmp_path: Path) -> None:
    df = split_by_group(read_image_folder(tiny_image_folder), fractions=(0.5, 0.25, 0.25), seed=1)
    df["colour"] = df["label"].str.split("_").str[0]
    path = write_manifest(df, tmp_path / "out" / "records.csv")
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    back = read_manifest(path)
    pd.testing.assert_frame_equal(back, df, check_dtype=False)


def test_csv_relative_paths_survive_a_move(tiny_image_folder: Path, tmp_path: Path) -> None:
    df = read_image_folder(tiny_image_folder)
    manifest = write_manifest(df, tiny_image_folder / "records.csv", relative_paths=True)
    assert "red_horizontal/00.png" in manifest.read_text()
    assert str(tiny_image_folder) not in manifest.read_text()
    moved = tmp_path / "moved"
    tiny_image_folder.rename(moved)
    back = read_manifest(moved / "records.csv")
    assert back["path"].tolist() == [str(moved / i) for i in df["id"]]


def test_csv_refuses_images_only_in_memory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"only in memory.*\.parquet"):
        write_manifest(_records(2, 2), tmp_path / "m.csv")
    with pytest.raises(DataError, match=r"\.csv or \.parquet"):
        write_manifest(_records(2, 2), tmp_path / "m.txt")


def test_parquet_round_trip_keeps_images(tmp_path: Path) -> None:
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    deep = np.array([[0, 65535]], dtype=np.uint16)
    raw = pd.DataFrame(
        {
            "id": ["arr", "bytes", "deep"],
            "image": pd.Series([pixels, _png_bytes(9), deep], dtype=object),
            "label": ["a", "a", "b"],
        }
    )
    df = validate_records(raw, check_files=False)
    back = read_manifest(write_manifest(df, tmp_path / "m.parquet"))
    assert back["id"].tolist() == ["arr", "bytes", "deep"]
    assert all(isinstance(v, bytes) for v in back["image"])
    np.testing.assert_array_equal(load_image(back["image"][0]), load_image(pixels))
    np.testing.assert_array_equal(load_image(back["image"][1]), load_image(_png_bytes(9)))
    np.testing.assert_array_equal(load_image(back["image"][2]), load_image(deep))
    assert back["path"].isna().all()


# --------------------------------------------------------------------------------------------------
# Hugging Face datasets


def _hf_dataset(n: int = 6) -> object:
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=["cat", "dog"]),
            "source": datasets.Value("string"),
            "tags": datasets.Sequence(datasets.Value("string")),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "image": [{"bytes": _png_bytes(i * 10), "path": None} for i in range(n)],
            "label": [i % 2 for i in range(n)],
            "source": ["web"] * n,
            "tags": [["x"]] * n,
        },
        features=features,
    )


def test_read_hf_dataset_object_and_saved_folder(tmp_path: Path) -> None:
    ds = _hf_dataset()
    df = read_hf_dataset(ds)
    assert df["label"].tolist() == ["cat", "dog"] * 3
    assert df["id"].tolist()[0] == "hf-data-000000"
    assert isinstance(df["image"][0], bytes) and df["path"].isna().all()
    assert load_image(df["image"][2])[0, 0, 0] == 20
    assert "source" in df.columns and "tags" not in df.columns
    assert "hf_dataset" not in df.columns  # an object in memory has no folder to find its rows in again
    ds.save_to_disk(str(tmp_path / "saved"))  # type: ignore[attr-defined]
    saved = read_hf_dataset(tmp_path / "saved")
    way_back = ["hf_dataset", "hf_row", "hf_column"]
    pd.testing.assert_frame_equal(saved.drop(columns=way_back), df)
    assert saved[way_back].iloc[4].tolist() == [str(tmp_path / "saved"), 4, "image"]
    pd.testing.assert_frame_equal(read_records(tmp_path / "saved"), saved)


def test_read_hf_dataset_dict_gives_splits() -> None:
    import datasets

    dd = datasets.DatasetDict({"train": _hf_dataset(4), "validation": _hf_dataset(4)})
    df = read_hf_dataset(dd)
    assert df.groupby("split").size().to_dict() == {"train": 4, "val": 4}
    assert df["id"].is_unique and df["id"].iloc[-1] == "hf-val-000003"
    assert df.loc[df["split"] == "val", "is_query"].all()


def test_read_hf_dataset_arrays_and_errors(tmp_path: Path) -> None:
    import datasets

    arrays = datasets.Dataset.from_dict(
        {"pixels": [np.full((3, 3), i, dtype=np.uint8) for i in range(4)], "y": [0, 0, 1, 1]},
        features=datasets.Features(
            {"pixels": datasets.Array2D((3, 3), "uint8"), "y": datasets.Value("int64")}
        ),
    )
    df = read_hf_dataset(arrays, image_column="pixels", label_column="y")
    assert df["label"].tolist() == ["0", "0", "1", "1"]
    assert isinstance(df["image"][3], np.ndarray) and df["image"][3].shape == (3, 3)
    assert load_image(df["image"][3])[0, 0, 0] == 3
    with pytest.raises(DataError, match=r"no column\(s\) \['label'\]"):
        read_hf_dataset(arrays, image_column="pixels")
    with pytest.raises(DataError, match="never downloads from the hub"):
        read_hf_dataset("someone/some-dataset")
    unlabelled = _hf_dataset(2).cast_column("label", datasets.Value("int64")).map(lambda r: {"label": -1})  # type: ignore[attr-defined]
    unlabelled = unlabelled.cast_column("label", datasets.ClassLabel(names=["cat", "dog"]))
    with pytest.raises(DataError, match="label -1"):
        read_hf_dataset(unlabelled)


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x08 << 8 | array.ndim  # 0x08: unsigned byte data
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion_mnist(root: Path, n_train: int = 30, n_test: int = 20) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = np.stack([np.full((28, 28), i, dtype=np.uint8) for i in range(n)])
        _write_idx(root / f"{stem}-images-idx3-ubyte.gz", images)
        _write_idx(root / f"{stem}-labels-idx1-ubyte.gz", labels)
    return root


def test_read_fashion_mnist_from_idx_files(tmp_path: Path) -> None:
    root = _fake_fashion_mnist(tmp_path / "fm")
    df = read_fashion_mnist(root)
    assert len(df) == 50 and df.groupby("split").size().to_dict() == {"test": 20, "train": 30}
    first = df.iloc[0]
    assert first["id"] == "fmnist-train-000000" and first["label"] == "T-shirt/top"
    assert first["image"].shape == (28, 28) and first["image"].dtype == np.uint8
    assert df.set_index("id").loc["fmnist-test-000013", "label"] == FASHION_MNIST_CLASSES[3]
    assert int(df.set_index("id").loc["fmnist-test-000013", "image"][0, 0]) == 13
    limited = read_fashion_mnist(root, subset="train", limit_per_class=2)
    assert len(limited) == 20 and (limited["label"].value_counts() == 2).all()
    assert limited["id"].tolist()[:3] == ["fmnist-train-000000", "fmnist-train-000001", "fmnist-train-000002"]
    assert read_records("fashion-mnist", root=root, subset="test")["split"].eq("test").all()


def test_fashion_mnist_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="sudo apt-get install dataset-fashion-mnist"):
        read_fashion_mnist(tmp_path / "nowhere")
    root = _fake_fashion_mnist(tmp_path / "fm")
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    with pytest.raises(DataError, match="20 images but 5 labels"):
        read_fashion_mnist(root, subset="test")
    (root / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01junk"))
    with pytest.raises(DataError, match="not an idx file"):
        read_fashion_mnist(root, subset="train")
    with pytest.raises(DataError, match="subset"):
        read_fashion_mnist(root, subset="dev")  # type: ignore[arg-type]


@pytest.mark.skipif(
    not Path(FASHION_MNIST_ROOT, "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (sudo apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_test_split() -> None:
    df = read_fashion_mnist(subset="test", limit_per_class=3)
    assert len(df) == 30
    assert sorted(df["label"].unique()) == sorted(FASHION_MNIST_CLASSES)
    assert df["id"].str.match(r"^fmnist-test-\d{6}$").all()
    image = df["image"].iloc[0]
    assert image.shape == (28, 28) and image.dtype == np.uint8 and image.max() > 100


# --------------------------------------------------------------------------------------------------
# dispatch


def test_read_records_dispatch(tiny_image_folder: Path, tmp_path: Path) -> None:
    folder = read_records(tiny_image_folder)
    assert len(folder) == 48
    csv = write_manifest(folder, tmp_path / "m.csv")
    parquet = write_manifest(folder, tmp_path / "m.parquet")
    pd.testing.assert_frame_equal(read_records(csv), folder, check_dtype=False)
    pd.testing.assert_frame_equal(read_records(str(parquet)), folder, check_dtype=False)
    pd.testing.assert_frame_equal(read_records(folder), folder)
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "nothing-here")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(DataError, match=r"not a \.csv/\.parquet manifest"):
        read_records(tmp_path / "x.txt")
    with pytest.raises(DataError, match="unsupported data source"):
        read_records(42)


# --------------------------------------------------------------------------------------------------
# splits


def test_split_by_class_is_class_disjoint_and_deterministic() -> None:
    df = _records(20, 3)
    out = split_by_class(df, fractions=(0.6, 0.2, 0.2), seed=7)
    per_split = {s: set(out.loc[out["split"] == s, "label"]) for s in ("train", "val", "test")}
    assert [len(per_split[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert not (per_split["train"] & per_split["val"]) and not (per_split["val"] & per_split["test"])
    assert out.groupby("label")["split"].nunique().max() == 1
    pd.testing.assert_frame_equal(out, split_by_class(df, fractions=(0.6, 0.2, 0.2), seed=7))
    other = split_by_class(df, fractions=(0.6, 0.2, 0.2), seed=8)
    assert not out["split"].equals(other["split"])
    assert (out["is_query"] == (out["split"] != "train")).all()
    assert (out["is_gallery"] == out["is_query"]).all()
    validate_records(out, check_files=False)


def test_split_by_class_keeps_linked_classes_together() -> None:
    df = _records(10, 2)
    df.loc[df["id"] == "c00-0", "group"] = "shared"
    df.loc[df["id"] == "c01-0", "group"] = "shared"
    for seed in range(5):
        out = split_by_class(df, fractions=(0.5, 0.25, 0.25), seed=seed)
        assert (
            out.loc[out["label"] == "c00", "split"].iloc[0] == out.loc[out["label"] == "c01", "split"].iloc[0]
        )
        validate_records(out, check_files=False)


def test_split_fractions_are_checked(caplog: pytest.LogCaptureFixture) -> None:
    df = _records(3, 2)
    for bad in ((0.5, 0.5), (0.8, 0.3, 0.1), (-0.1, 0.6, 0.5)):
        with pytest.raises(DataError, match="fractions"):
            split_by_class(df, fractions=bad)
    with caplog.at_level(logging.WARNING, logger="deepfeat.finetune.data.splits"):
        out = split_by_class(_records(2, 2), fractions=(0.8, 0.1, 0.1))
    assert "is empty although its fraction" in caplog.text
    assert set(out["split"]) == {"train", "val"}


def test_split_by_group_keeps_groups_whole_and_classes_shared() -> None:
    df = _records(5, 20)
    df["group"] = [f"{label}-g{i // 2}" for label, i in zip(df["label"], range(len(df)), strict=True)]
    out = split_by_group(df, fractions=(0.6, 0.2, 0.2), seed=3)
    assert out.groupby("group")["split"].nunique().max() == 1
    counts = out.groupby(["label", "split"]).size().unstack()
    assert list(counts.columns) == ["test", "train", "val"] and not counts.isna().any().any()
    assert counts["train"].between(10, 14).all() and counts["val"].between(2, 6).all()
    pd.testing.assert_frame_equal(out, split_by_group(df, fractions=(0.6, 0.2, 0.2), seed=3))
    assert not out["split"].equals(split_by_group(df, fractions=(0.6, 0.2, 0.2), seed=4)["split"])
    validate_records(out, check_files=False)


def test_split_by_group_multi_label_group_follows_its_main_class() -> None:
    df = _records(2, 10)
    df.loc[df["id"].isin(["c00-0", "c00-1", "c01-0"]), "group"] = "mixed"
    out = split_by_group(df, fractions=(0.5, 0.5, 0.0), seed=0)
    assert out.loc[out["group"] == "mixed", "split"].nunique() == 1
    assert (out["split"] != "test").all()


def test_assign_query_gallery_all_vs_all_and_holdout() -> None:
    df = split_by_group(_records(4, 9), fractions=(0.0, 1.0, 0.0))
    df = pd.concat([df, _records(1, 3).assign(id=lambda d: "extra-" + d["id"])], ignore_index=True)
    everything = assign_query_gallery(df, split="val", mode="all_vs_all")
    val = everything["split"] == "val"
    assert everything.loc[val, "is_query"].all() and everything.loc[val, "is_gallery"].all()
    assert not everything.loc[~val, "is_query"].any()

    holdout = assign_query_gallery(df, split="val", mode="holdout", query_fraction=1 / 3, seed=5)
    rows = holdout[holdout["split"] == "val"]
    assert not (rows["is_query"] & rows["is_gallery"]).any()
    assert (rows["is_query"] | rows["is_gallery"]).all()
    assert (rows.groupby("label")["is_query"].sum() == 3).all()
    pd.testing.assert_frame_equal(
        holdout, assign_query_gallery(df, split="val", mode="holdout", query_fraction=1 / 3, seed=5)
    )
    pd.testing.assert_frame_equal(holdout[holdout["split"] != "val"], df[df["split"] != "val"])
    assert check_retrievable(holdout, "val") == 12


def test_holdout_edge_cases() -> None:
    df = _records(3, 1, split="val")
    df = pd.concat([df, _records(1, 2, split="val").assign(id=lambda d: "p-" + d["id"], label="pair")])
    out = assign_query_gallery(df, split="val", mode="holdout", query_fraction=0.9)
    pair = out[out["label"] == "pair"]
    assert pair["is_query"].sum() == 1 and pair["is_gallery"].sum() == 1
    singles = out[out["label"] != "pair"]
    assert not singles["is_query"].any() and singles["is_gallery"].all()
    with pytest.raises(DataError, match="split 'test' has no records"):
        assign_query_gallery(df, split="test")
    with pytest.raises(DataError, match="query_fraction"):
        assign_query_gallery(df, split="val", mode="holdout", query_fraction=1.0)
    with pytest.raises(DataError, match="mode"):
        assign_query_gallery(df, split="val", mode="random")  # type: ignore[arg-type]


def test_read_hf_dataset_referencing_files_and_a_path_column(tiny_image_folder: Path) -> None:
    import datasets

    files = sorted(str(p) for p in tiny_image_folder.glob("*/*.png"))[:4]
    ds = datasets.Dataset.from_dict(
        {
            "image": [{"path": f, "bytes": None} for f in files],
            "label": ["a", "a", "b", "b"],
            "path": ["orig"] * 4,
        },
        features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.Value("string"), "path": datasets.Value("string")}
        ),
    )
    df = read_hf_dataset(ds)
    assert df["path"].tolist() == files and df["image"].isna().all()
    assert df["source_path"].tolist() == ["orig"] * 4
    assert load_image(df["path"][0]).shape == (32, 32, 3)


def test_ids_default_to_paths_only_when_every_row_has_one() -> None:
    raw = pd.DataFrame({"path": ["a.png", None], "image": [None, b"x"], "label": ["l", "l"]})
    with pytest.raises(DataError, match="add an id column"):
        validate_records(raw, check_files=False)
