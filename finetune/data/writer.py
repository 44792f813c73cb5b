"""Writing records to a CSV or Parquet manifest, which :func:`~deepfeat.finetune.data.readers.read_manifest` reads."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from deepfeat.finetune.data.contract import few, normalise_records
from deepfeat.finetune.errors import DataError

__all__ = ["write_manifest"]

logger = logging.getLogger(__name__)


def write_manifest(
    df: pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    relative_paths: bool = False,
) -> Path:
    """Write records to a CSV or Parquet manifest (chosen by the suffix), atomically.

    CSV cannot hold images: the ``image`` column is dropped, which is refused when some rows hold
    their image only in memory (no ``path``). Parquet keeps encoded bytes as they are and stores
    arrays as lossless PNG bytes (uint16 arrays as 16-bit PNG), which
    :func:`~deepfeat.finetune.data.images.load_image` decodes to the same pixels.

    Args:
        df: records (validated here, files are not checked).
        path: ``*.csv``, ``*.parquet`` or ``*.pq``; parent folders are created.
        relative_paths: write paths inside the manifest's folder relative to it, so the folder can
            be moved (:func:`read_manifest` resolves them again).

    Returns:
        The path written.

    Raises:
        DataError: unsupported suffix, in-memory images for CSV, or a table that breaks the contract.
    """
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise DataError(f"manifest path must end in .csv or .parquet, got {str(file)!r}")
    out = normalise_records(df, root=None, check_files=False)
    in_memory = out["image"].notna()
    if suffix == ".csv":
        only_in_memory = in_memory & out["path"].isna()
        if only_in_memory.any():
            raise DataError(
                f"{int(only_in_memory.sum())} record(s) hold their image only in memory (no path), e.g. "
                f"{few(out.loc[only_in_memory, 'id'])}; CSV cannot store images: write a .parquet "
                "manifest, or save the images to files and set path"
            )
        if in_memory.any():
            logger.info("dropping the in-memory image column for CSV; the paths are kept")
        out = out.drop(columns=["image"])
    else:
        out["image"] = pd.Series(
            [
                _encode_array(v, i) if isinstance(v, np.ndarray) else v
                for v, i in zip(out["image"], out["id"], strict=True)
            ],
            dtype=object,
            index=out.index,
        )
    if relative_paths:
        base = os.path.normpath(str(file.absolute().parent))
        out["path"] = pd.Series([_relative(p, base) for p in out["path"]], dtype=object, index=out.index)

    file.parent.mkdir(parents=True, exist_ok=True)
    temporary = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        if suffix == ".csv":
            out.to_csv(temporary, index=False)
        else:
            out.to_parquet(temporary, index=False)
        os.replace(temporary, file)
    except Exception as exc:
        temporary.unlink(missing_ok=True)
        raise DataError(f"cannot write manifest {str(file)!r}: {type(exc).__name__}: {exc}") from exc
    logger.info("wrote %d record(s) to %s", len(out), file)
    return file


def _relative(path: Any, base: str) -> Any:
    if not isinstance(path, str) or not os.path.isabs(path):
        return path
    norm = os.path.normpath(path)
    if os.path.commonpath([base, norm]) != base:
        return path
    return Path(os.path.relpath(norm, base)).as_posix()


def _encode_array(array: np.ndarray, record_id: str) -> bytes:
    pixels = array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array
    ok = (
        pixels.dtype == np.uint8 and (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (3, 4)))
    ) or (pixels.dtype == np.uint16 and pixels.ndim == 2)
    if not ok:
        raise DataError(
            f"record {record_id!r}: cannot store a {pixels.dtype} array of shape {tuple(array.shape)} as "
            "PNG; use uint8 (H, W[, 3 or 4]) or uint16 (H, W) arrays"
        )
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()

