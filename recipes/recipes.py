"""Helpers shared by the recipes' actions: records and images (picking queries, decoding pictures).

The Milvus side (filters, fetches, per-query searches, whole collections) is the query layer,
:mod:`deepfeat.connectors.query`; the config is :mod:`deepfeat.recipes.config` and the run
:mod:`deepfeat.recipes.engine`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from deepfeat.finetune.data.contract import validate_records
from deepfeat.finetune.data.dataset import record_source
from deepfeat.finetune.data.images import IMAGE_EXTENSIONS, load_image
from deepfeat.finetune.data.readers import (
    HF_DATASET_COLUMN,
    HF_IMAGE_COLUMN,
    HF_ROW_COLUMN,
    read_hf_image,
    read_manifest,
    read_records,
)
from deepfeat.finetune.errors import DataError, DeepfeatError

log = logging.getLogger(__name__)

__all__ = ["list_images", "pick_queries", "read_any", "record_image"]

# --------------------------------------------------------------------------------------------------
# records and images


def read_any(source: str | os.PathLike[str], *, label: str = "unlabelled") -> pd.DataFrame:
    """Records from any source ``read_records`` takes, or from a flat folder of images (one ``label``).

    A folder of loose images (no class sub-folders) is what an unlabelled collection looks like; its
    records all get ``label``.
    """
    path = Path(source)
    if path.is_dir() and not any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir()):
        files = list_images(path)
        if not files:
            raise DataError(f"no images in {str(path)!r}")
        rows = pd.DataFrame(
            {"id": [Path(f).relative_to(path.absolute()).as_posix() for f in files], "path": files, "label": label}
        )
        return validate_records(rows, root=path.absolute())
    return read_records(os.fspath(source) if isinstance(source, os.PathLike) else source)


def list_images(source: str | os.PathLike[str]) -> list[str]:
    """Image files named by ``source``: a file, a folder (recursively, sorted) or a CSV/Parquet manifest.

    Raises:
        DataError: nothing exists at ``source`` or it holds no image.
    """
    path = Path(source)
    if path.is_file() and path.suffix.lower() in (".csv", ".parquet", ".pq"):
        return [str(p) for p in read_manifest(path)["path"].dropna()]
    if path.is_file():
        return [str(path.absolute())]
    if path.is_dir():
        return sorted(
            str(p.absolute())
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    raise DataError(f"{os.fspath(source)!r} does not exist; pass an image, a folder of images or a manifest")


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value)) and str(value) != ""


def record_image(row: Mapping[str, Any] | pd.Series) -> np.ndarray | None:
    """A record's decoded image, or ``None`` when it cannot be read (pictures skip it).

    A record of a Hugging Face ``save_to_disk`` folder without its in-memory image (a Milvus hit, a record fetched
    back) is read from the folder by its ``hf_dataset`` / ``hf_row`` / ``hf_column`` (:func:`read_hf_image`).
    """
    try:
        image = row.get("image")
        has_image = image is not None and not (isinstance(image, float) and np.isnan(image))
        if not has_image and not _present(row.get("path")) and _present(row.get(HF_DATASET_COLUMN)):
            column = row.get(HF_IMAGE_COLUMN)
            source = read_hf_image(str(row[HF_DATASET_COLUMN]), int(row[HF_ROW_COLUMN]),
                                   str(column) if _present(column) else "image")
            return load_image(source)
        return load_image(record_source(row))  # type: ignore[arg-type]
    except DeepfeatError as exc:
        log.warning("no picture of %s: %s", row.get("id", "?"), exc)
        return None


def pick_queries(
    records: pd.DataFrame,
    n: int,
    *,
    split: str = "test",
    per: str = "label",
    distinct: str | None = "group",
    seed: int = 0,
) -> pd.DataFrame:
    """Up to ``n`` query records of ``split`` (all records when it has none), spread over ``per`` values,
    at most one per ``distinct`` value (one photo per product, one scan per patient)."""
    pool = records[(records["split"] == split) & records["is_query"]] if "is_query" in records else records
    if pool.empty:
        pool = records[records["split"] == split]
    if pool.empty:
        pool = records
    shuffled = pool.sample(frac=1.0, random_state=seed)
    if distinct is not None:
        shuffled = shuffled.drop_duplicates(distinct)
    order = shuffled.groupby(per, sort=True).cumcount()  # round-robin over the classes
    return (
        shuffled.assign(_turn=order.to_numpy()).sort_values(["_turn", per], kind="stable").head(n).drop(columns="_turn")
    )
