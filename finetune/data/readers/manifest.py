"""CSV and Parquet manifests (one row per image, the record columns plus metadata) as records."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from deepfeat.finetune.data.contract import (
    check_record_files,
    file_kind,
    ids_from_paths,
    path_values,
    validate_records,
)
from deepfeat.finetune.errors import DataError

__all__ = ["read_manifest"]

logger = logging.getLogger(__name__)


def read_manifest(
    path: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    check_files: bool = True,
) -> pd.DataFrame:
    """Read a CSV or Parquet manifest of records.

    Relative paths are resolved against ``root`` when given (and must then stay inside it), else
    against the manifest's own folder (where ``../images/x.jpg`` is allowed). A missing ``id`` column
    is filled with the paths as written in the manifest. CSV cells are read as text and only empty
    cells count as missing, so a class named ``NA`` stays ``"NA"``. ``check_files=False`` keeps rows
    whose file is missing (a run with ``on_error='skip'`` then reports each of them).

    Raises:
        DataError: the file is missing, not CSV/Parquet, unreadable, or its records are invalid.
    """
    file = Path(path)
    if not file.is_file():
        kind = file_kind(file)
        what = "does not exist" if kind == "missing" else f"is {kind}, not a CSV/Parquet file"
        raise DataError(f"manifest {os.fspath(path)!r} {what}; pass the path of a .csv or .parquet manifest")
    suffix = file.suffix.lower()
    try:
        if suffix == ".csv":
            text_columns = {c: str for c in ("id", "path", "label", "split", "group")}
            df = pd.read_csv(file, dtype=text_columns, keep_default_na=False, na_values=[""])
            if "image" in df.columns:
                hint = " rename it to 'path' if it holds file paths;" if "path" not in df.columns else ""
                raise DataError(
                    f"CSV manifest {str(file)!r} has an 'image' column, but CSV cannot hold images;{hint} "
                    "otherwise drop it or use a Parquet manifest"
                )
        elif suffix in (".parquet", ".pq"):
            df = pd.read_parquet(file)
        else:
            raise DataError(
                f"manifest {str(file)!r} must end in .csv or .parquet, got {suffix or 'no suffix'!r}"
            )
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read manifest {str(file)!r}: {type(exc).__name__}: {exc}") from exc

    if "path" in df.columns:
        given = path_values(df["path"])
        if "id" not in df.columns:
            df["id"] = ids_from_paths(given)
        if root is None:
            base = str(file.absolute().parent)
            df["path"] = pd.Series(
                [None if p is None else os.path.normpath(os.path.join(base, p)) for p in given],
                dtype=object,
                index=df.index,
            )
    logger.info("read %d record(s) from %s", len(df), file)
    out = validate_records(df, root=root, check_files=False)
    if check_files:
        # name where relative paths were really looked for, not the working folder
        if root is None:
            against = f"the manifest's folder {os.path.normpath(file.absolute().parent)!r}"
        else:
            against = f"the data root {os.path.abspath(os.fspath(root))!r}"
        check_record_files(out, resolved_against=against)
    return out

