"""Readers: one module per data source, behind one factory, :func:`read_records`.

==============  ===================================================================
``folder``      an image folder with one sub-folder per class (:func:`read_image_folder`)
``manifest``    a CSV or Parquet manifest (:func:`read_manifest`)
``hf``          a Hugging Face ``datasets`` dataset or ``save_to_disk`` folder (:func:`read_hf_dataset`)
``idx``         Fashion-MNIST's idx files (:func:`read_fashion_mnist`)
==============  ===================================================================

Every reader returns records checked by :func:`~deepfeat.finetune.data.contract.validate_records`.
A new source is a new module here plus one branch in :func:`read_records`; optional packages are
imported inside the reader that needs them (as ``datasets`` in ``hf``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from deepfeat.finetune.data.contract import file_kind, validate_records
from deepfeat.finetune.data.readers.folder import read_image_folder
from deepfeat.finetune.data.readers.hf import (
    HF_DATASET_COLUMN,
    HF_IMAGE_COLUMN,
    HF_ROW_COLUMN,
    read_hf_dataset,
    read_hf_image,
)
from deepfeat.finetune.data.readers.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, read_fashion_mnist
from deepfeat.finetune.data.readers.manifest import read_manifest
from deepfeat.finetune.errors import DataError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "HF_DATASET_COLUMN",
    "HF_IMAGE_COLUMN",
    "HF_ROW_COLUMN",
    "read_fashion_mnist",
    "read_hf_dataset",
    "read_hf_image",
    "read_image_folder",
    "read_manifest",
    "read_records",
]


def read_records(source: Any, *, check_files: bool = True, **kwargs: Any) -> pd.DataFrame:
    """Read records from any supported source.

    ``source`` may be a record ``DataFrame`` (validated), a ``datasets.Dataset``/``DatasetDict``, the
    string ``"fashion-mnist"``, a ``.csv``/``.parquet`` manifest, a folder saved with
    ``Dataset.save_to_disk`` (it holds ``state.json`` or ``dataset_dict.json``), or an image folder
    with one sub-folder per class. ``kwargs`` go to the matching reader.

    ``check_files=False`` keeps records whose image file is missing or a broken link (image folders,
    manifests, tables), for callers that report and skip unreadable images one by one instead of
    refusing the whole source (``deepfeat embed --on-error skip``, ``deepfeat sync``).

    Raises:
        DataError: the source does not exist or is of no supported kind.
    """
    if isinstance(source, pd.DataFrame):
        return validate_records(source, check_files=check_files, **kwargs)
    if isinstance(source, str) and source.lower() in ("fashion-mnist", "fashion_mnist", "fmnist"):
        return read_fashion_mnist(**kwargs)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file():
            if path.suffix.lower() in (".csv", ".parquet", ".pq"):
                return read_manifest(path, check_files=check_files, **kwargs)
            raise DataError(
                f"{os.fspath(source)!r} is a file but not a .csv/.parquet manifest; pass a manifest, an "
                "image folder, a saved Hugging Face dataset folder or 'fashion-mnist'"
            )
        if path.is_dir():
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                return read_hf_dataset(path, **kwargs)
            root = kwargs.pop("root", None)
            if root is not None and os.path.abspath(root) != os.path.abspath(path):
                raise DataError(
                    f"a data root ({os.fspath(root)!r}) applies to manifests; the image folder "
                    f"{os.fspath(source)!r} is its own root: drop the root"
                )
            return read_image_folder(path, check_files=check_files, **kwargs)
        kind = file_kind(path)
        what = "does not exist" if kind == "missing" else f"is {kind}, neither a manifest nor a folder"
        raise DataError(
            f"data source {os.fspath(source)!r} {what}; pass an image folder, a .csv/.parquet "
            "manifest, a saved Hugging Face dataset folder or 'fashion-mnist'"
        )
    if type(source).__module__.startswith("datasets"):
        return read_hf_dataset(source, **kwargs)
    raise DataError(f"unsupported data source of type {type(source).__name__}")

