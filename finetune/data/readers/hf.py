"""Hugging Face ``datasets`` (a ``Dataset``, a ``DatasetDict`` or a ``save_to_disk`` folder) as records.

``datasets`` is imported inside the functions that need it, so importing the readers stays light.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from deepfeat.finetune.data.contract import SPLIT_ALIASES, SPLITS, validate_records
from deepfeat.finetune.data.images import ImageSource
from deepfeat.finetune.errors import DataError

__all__ = ["HF_DATASET_COLUMN", "HF_IMAGE_COLUMN", "HF_ROW_COLUMN", "read_hf_dataset", "read_hf_image"]

logger = logging.getLogger(__name__)

#: Metadata column: the ``save_to_disk`` folder of the record's split (absolute).
HF_DATASET_COLUMN = "hf_dataset"
#: Metadata column: the record's row in that folder's dataset.
HF_ROW_COLUMN = "hf_row"
#: Metadata column: the dataset column that holds the record's image.
HF_IMAGE_COLUMN = "hf_column"
_WAY_BACK = (HF_DATASET_COLUMN, HF_ROW_COLUMN, HF_IMAGE_COLUMN)


def read_hf_dataset(
    ds_or_path: Any,
    image_column: str = "image",
    label_column: str = "label",
) -> pd.DataFrame:
    """Read a Hugging Face ``datasets.Dataset`` (or ``DatasetDict``), or one saved with ``save_to_disk``.

    Never touches the hub: a path is opened with :func:`datasets.load_from_disk`; to use a hub
    dataset, load it yourself and pass the object. Images are not decoded: an ``Image`` feature is
    stored as its encoded bytes (or its file path when the dataset only references files), an array
    feature as a numpy array. A ``ClassLabel`` label is stored by name. A ``DatasetDict`` gives one
    split per key (``validation`` becomes ``val``); a plain dataset goes to ``train`` unless it has a
    ``split`` column or is named ``validation``/``test``. Ids come from an ``id`` column when present,
    else ``hf-<split>-<row>``. Other scalar columns become metadata.

    A way back to each picture: when read from a ``save_to_disk`` folder, every record also gets the
    metadata :data:`HF_DATASET_COLUMN` (the folder of its split), :data:`HF_ROW_COLUMN` (its row there)
    and :data:`HF_IMAGE_COLUMN` (the image column), which reach the embedding shards and Milvus as
    scalar fields (the ``image`` bytes do not), so :func:`read_hf_image` can give a search hit its
    picture. A dataset object passed in memory has no such folder (save it and pass the folder).

    Raises:
        DataError: the path is not a saved dataset, a column is missing, or labels are missing (-1).
    """
    try:
        import datasets
    except ImportError as exc:  # a core dependency; say what to do if it is gone
        raise DataError("read_hf_dataset needs the 'datasets' package: pip install datasets") from exc

    source = ds_or_path
    folder: Path | None = None
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source).absolute()
        if not folder.is_dir():
            raise DataError(
                f"{os.fspath(source)!r} is not a folder saved with Dataset.save_to_disk(); deepfeat never "
                "downloads from the hub: call datasets.load_dataset(...) yourself and pass the dataset"
            )
        try:
            source = datasets.load_from_disk(os.fspath(folder))
        except Exception as exc:
            raise DataError(f"cannot open {os.fspath(source)!r} with datasets.load_from_disk: {exc}") from exc

    if isinstance(source, datasets.DatasetDict):
        parts = [
            _with_way_back(
                _hf_frame(part, image_column, label_column, split_name=str(name)),
                None if folder is None else folder / str(name),
                image_column,
            )
            for name, part in source.items()
        ]
        if not parts:
            raise DataError("the DatasetDict holds no splits")
        df = pd.concat(parts, ignore_index=True)
    elif isinstance(source, datasets.Dataset):
        name = str(source.split) if source.split is not None else None
        df = _with_way_back(_hf_frame(source, image_column, label_column, split_name=name), folder, image_column)
    else:
        raise DataError(
            f"read_hf_dataset needs a datasets.Dataset, a DatasetDict or a save_to_disk folder, got "
            f"{type(source).__name__}"
        )
    if folder is None and df["image"].notna().any():
        logger.info(
            "the dataset was passed in memory: its records keep their image bytes for embedding, but search "
            "hits cannot show them later; save it with save_to_disk() and read the folder to keep a way back"
        )
    return validate_records(df)


def _hf_frame(ds: Any, image_column: str, label_column: str, *, split_name: str | None) -> pd.DataFrame:
    import datasets

    features = ds.features
    missing = [c for c in (image_column, label_column) if c not in features]
    if missing:
        raise DataError(
            f"the dataset{f' split {split_name!r}' if split_name else ''} has no column(s) {missing}; "
            f"columns: {list(features)}; pass image_column= / label_column="
        )
    n = len(ds)
    prefix = SPLIT_ALIASES.get((split_name or "").lower(), (split_name or "").lower())
    split = prefix if prefix in SPLITS else "train"

    paths, images = _hf_images(ds, image_column)
    labels = _hf_labels(ds, label_column)
    df = pd.DataFrame({"label": labels})
    if "id" in features and "id" not in (image_column, label_column):
        df["id"] = [str(v) for v in ds["id"]]
    else:
        df["id"] = [f"hf-{prefix or 'data'}-{row:06d}" for row in range(n)]
    df["path"] = pd.Series(paths, dtype=object)
    df["image"] = pd.Series(images, dtype=object)
    if "split" not in features:
        df["split"] = split
    dropped = []
    for column, feature in features.items():
        if column in (image_column, label_column, "id"):
            continue
        # another "path"/"image" column describes the source, not the file deepfeat should read
        name = f"source_{column}" if column in ("path", "image") else column
        if isinstance(feature, (datasets.Value, datasets.ClassLabel)):
            values = list(ds[column])
            if isinstance(feature, datasets.ClassLabel):
                values = feature.int2str(values)
            df[name] = values
        else:
            dropped.append(column)
    if dropped:
        logger.info("dropping non-scalar dataset column(s) %s from the records", dropped)
    return df


def _hf_images(ds: Any, image_column: str) -> tuple[list[str | None], list[bytes | np.ndarray | None]]:
    """The image column undecoded: encoded bytes (or the referenced file's path), or numpy arrays."""
    import datasets

    n = len(ds)
    paths: list[str | None] = [None] * n
    images: list[bytes | np.ndarray | None]
    image_feature = ds.features[image_column]
    if isinstance(image_feature, datasets.Image):
        encoded = ds.cast_column(image_column, datasets.Image(decode=False))[image_column]
        images = []
        for row, item in enumerate(encoded):
            data = item.get("bytes") if item else None
            if data:
                images.append(bytes(data))
            else:
                images.append(None)
                paths[row] = item.get("path") if item else None
    else:
        # the numpy formatter widens integers to int64; restore the declared pixel type
        dtype = _declared_dtype(image_feature)
        images = [
            None if v is None else np.asarray(v, dtype=dtype) for v in ds.with_format("numpy")[image_column]
        ]
    return paths, images


def _hf_labels(ds: Any, label_column: str) -> list[Any]:
    """The labels; a ``ClassLabel`` by name (an unlabelled row, -1, is refused)."""
    import datasets

    label_feature = ds.features[label_column]
    raw_labels = list(ds[label_column])
    if isinstance(label_feature, datasets.ClassLabel):
        unlabelled = sum(1 for v in raw_labels if v is None or v < 0)
        if unlabelled:
            raise DataError(
                f"{unlabelled} row(s) have label -1 (no label) in column {label_column!r}; drop them, "
                "e.g. ds.filter(lambda r: r['label'] >= 0)"
            )
        return list(label_feature.int2str(raw_labels))
    return raw_labels


def _declared_dtype(feature: Any) -> np.dtype[Any] | None:
    """The element type an array feature (Array2D, List of Value, ...) was declared with."""
    for _ in range(8):
        dtype = getattr(feature, "dtype", None)
        if isinstance(dtype, str):
            try:
                return np.dtype(dtype)
            except TypeError:
                return None
        feature = getattr(feature, "feature", None)
        if feature is None:
            return None
    return None


def _with_way_back(df: pd.DataFrame, folder: Path | None, image_column: str) -> pd.DataFrame:
    """Add the folder / row / column of each record, when ``folder`` is a saved dataset."""
    if folder is None or not (folder / "state.json").is_file():
        return df
    clash = [c for c in _WAY_BACK if c in df.columns]
    if clash:
        logger.warning("the dataset has its own column(s) %s; no way back to the images is recorded", clash)
        return df
    out = df.copy()
    out[HF_DATASET_COLUMN] = str(folder)
    out[HF_ROW_COLUMN] = np.arange(len(out), dtype=np.int64)
    out[HF_IMAGE_COLUMN] = image_column
    return out


def read_hf_image(dataset: str | os.PathLike[str], row: int, column: str = "image") -> ImageSource:
    """The image of one row of a ``save_to_disk`` folder, undecoded: what a record's ``image`` held.

    This is the way back from a search hit to its picture: pass the hit's :data:`HF_DATASET_COLUMN`,
    :data:`HF_ROW_COLUMN` and :data:`HF_IMAGE_COLUMN` values. Folders stay open (memory-mapped) between
    calls, so a page of hits reads each folder once.

    Returns:
        The encoded bytes, the referenced file's path (datasets that only reference files), or a numpy
        array (array features); :func:`~deepfeat.finetune.data.images.load_image` decodes any of them.

    Raises:
        DataError: the folder is not a saved dataset, or has no such column or row.
    """
    ds = _open_saved(os.path.abspath(os.fspath(dataset)))
    if column not in ds.features:
        raise DataError(f"the dataset at {os.fspath(dataset)!r} has no column {column!r}; columns: {list(ds.features)}")
    if not 0 <= int(row) < len(ds):
        raise DataError(
            f"row {row} is outside the dataset at {os.fspath(dataset)!r} ({len(ds)} rows); it changed since the "
            "records were read: read it again and re-load the collection"
        )
    paths, images = _hf_images(ds.select([int(row)]), column)
    found = images[0] if images[0] is not None else paths[0]
    if found is None:
        raise DataError(f"row {row} of {os.fspath(dataset)!r} holds no image in column {column!r}")
    return found


@functools.lru_cache(maxsize=8)
def _open_saved(folder: str) -> Any:
    import datasets

    if not (Path(folder) / "state.json").is_file():
        raise DataError(
            f"{folder!r} is not a dataset folder written by Dataset.save_to_disk() (no state.json); it was "
            "moved or deleted since the records were read"
        )
    try:
        return datasets.load_from_disk(folder)
    except Exception as exc:
        raise DataError(f"cannot open {folder!r} with datasets.load_from_disk: {exc}") from exc
