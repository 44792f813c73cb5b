"""The record contract: one ``pandas.DataFrame`` row per image, checked by one gate.

Every data source (an image folder, a CSV/Parquet manifest, a Hugging Face ``datasets`` dataset,
Fashion-MNIST; see :mod:`deepfeat.finetune.data.readers`) is turned into the same table, OML-style
(see ``docs/contracts.md``):

==============  ==========================================================================
``id``          unique, stable string id (for folders: the relative POSIX path)
``path``        image file path (absolute, or relative to the data root), or ``None``
``image``       in-memory image (encoded bytes or an HxW / HxWxC array), or ``None``
``label``       class label, always ``str``
``split``       ``"train"``, ``"val"`` or ``"test"``
``is_query``    row is a query in retrieval evaluation
``is_gallery``  row is in the gallery in retrieval evaluation
``group``       product / patient id that never straddles splits (defaults to ``id``)
anything else   free scalar metadata
==============  ==========================================================================

:func:`validate_records` is the single gate: every reader returns its output, and it raises
:class:`~deepfeat.finetune.errors.DataError` with what was wrong, what was received and how to fix it.
:func:`check_retrievable` says whether retrieval evaluation on a split can score at all.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd

from deepfeat.finetune.errors import DataError

__all__ = [
    "OPTIONAL_COLUMNS",
    "RECORD_COLUMNS",
    "SPLITS",
    "SPLIT_ALIASES",
    "QueryGalleryMode",
    "Split",
    "check_record_files",
    "check_retrievable",
    "few",
    "file_kind",
    "ids_from_paths",
    "is_missing",
    "normalise_records",
    "path_values",
    "require_columns",
    "validate_records",
]

logger = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]
QueryGalleryMode = Literal["all_vs_all", "holdout"]

#: The split names records may use, in order.
SPLITS: tuple[Split, ...] = get_args(Split)
#: The contract columns, in the order :func:`validate_records` puts them (metadata follows).
RECORD_COLUMNS: tuple[str, ...] = ("id", "path", "image", "label", "split", "is_query", "is_gallery", "group")
#: Columns :func:`validate_records` fills in when they are absent.
OPTIONAL_COLUMNS: tuple[str, ...] = ("id", "path", "image", "split", "is_query", "is_gallery", "group")

#: Other spellings of split names seen in the wild (Hugging Face uses "validation"), read as the value.
SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}
_TRUE = frozenset({"true", "t", "yes", "y", "1"})
_FALSE = frozenset({"false", "f", "no", "n", "0"})
_SHOW = 5  # how many offending values an error message lists


def few(values: Iterable[Any], n: int = _SHOW) -> str:
    """The first ``n`` values as a short list for an error message (``[a, b, ...]``)."""
    items = list(values)
    shown = ", ".join(repr(v) for v in items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}]"


def is_missing(value: Any) -> bool:
    """Whether a cell is empty: ``None``, a float NaN, ``pd.NA`` or ``pd.NaT``."""
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return value is pd.NA or value is pd.NaT


# --------------------------------------------------------------------------------------------------
# validation


def validate_records(
    df: pd.DataFrame,
    *,
    root: str | os.PathLike[str] | None = None,
    check_files: bool = True,
) -> pd.DataFrame:
    """Check a record table against the contract and return a normalised copy.

    Normalisation: the index is reset; missing optional columns get defaults (``id`` = ``path`` as
    given, ``split`` = ``"train"``, ``is_query`` = ``is_gallery`` = ``split != "train"``, i.e. the
    all-vs-all protocol in evaluation splits, ``group`` = ``id``); labels become ``str`` (mixed types
    such as ``1`` and ``"1"`` are merged and a warning is logged); split aliases ``validation``/
    ``valid``/``dev`` become ``val``; booleans may be given as ``true/false``, ``yes/no`` or ``0/1``;
    ``path`` holds ``str`` or ``None``. When ``root`` is given, relative paths are joined to it and
    every path must stay inside it (a lexical check: ``..`` and foreign absolute paths are refused,
    symbolic links inside the root are trusted).

    Warnings (logged, not raised): a class with a single image in a split (retrieval and PK sampling
    need two), and an evaluation split without queries or without gallery items.

    Args:
        df: the table; the input is never modified.
        root: the data root that relative paths refer to and that no path may leave.
        check_files: check that every row without an in-memory image points to an existing file.

    Returns:
        A new DataFrame with the contract columns first (see :data:`RECORD_COLUMNS`), then metadata.

    Raises:
        DataError: required columns are missing, ids are duplicated, a split is unknown, files are
            missing, a path leaves ``root``, a row has neither path nor image, labels are empty, or a
            group straddles splits.
    """
    out = normalise_records(df, root=root, check_files=check_files)
    _warn_about_retrieval(out)
    return out


def normalise_records(df: pd.DataFrame, *, root: str | os.PathLike[str] | None, check_files: bool) -> pd.DataFrame:
    """:func:`validate_records` without its logged warnings (for writers, which re-check what they write)."""
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"records must be a pandas DataFrame, got {type(df).__name__}")
    if len(df) == 0:
        raise DataError("the record table is empty (0 rows); check the data source and any filters")
    columns = [str(c) for c in df.columns]
    if len(set(columns)) != len(columns):
        duplicated = sorted({c for c in columns if columns.count(c) > 1})
        raise DataError(f"the record table has duplicated column names {duplicated}; rename them")
    missing = []
    if "label" not in columns:
        missing.append("label")
    if "path" not in columns and "image" not in columns:
        missing.append("path or image")
    elif "id" not in columns and "path" not in columns:
        missing.append("id (needed when images are in memory)")
    if missing:
        raise DataError(
            f"the record table is missing required column(s): {', '.join(missing)}; received columns "
            f"{columns}; needed: label, and path or image (plus id when there is no path); optional: "
            "id, split, is_query, is_gallery, group"
        )

    out = df.copy()
    out.columns = pd.Index(columns)
    out = out.reset_index(drop=True)

    given_paths = path_values(out["path"]) if "path" in out.columns else [None] * len(out)
    images = _image_values(out["image"], out) if "image" in out.columns else [None] * len(out)

    ids = _id_values(out["id"]) if "id" in out.columns else ids_from_paths(given_paths)
    paths = _resolve_paths(given_paths, root) if root is not None else given_paths
    bare = [i for i, (p, im) in enumerate(zip(paths, images, strict=True)) if p is None and im is None]
    if bare:
        raise DataError(
            f"{len(bare)} row(s) have neither a path nor an in-memory image, e.g. ids "
            f"{few(ids[i] for i in bare)}; fill in the path column or drop these rows"
        )
    out["id"] = ids
    out["path"] = pd.Series(paths, dtype=object, index=out.index)
    out["image"] = pd.Series(images, dtype=object, index=out.index)

    duplicated_ids = out["id"][out["id"].duplicated(keep=False)]
    if len(duplicated_ids):
        uniq = list(dict.fromkeys(duplicated_ids))
        raise DataError(
            f"{len(uniq)} id(s) occur more than once, e.g. {few(uniq)}; ids must be unique "
            "(for folders they are relative paths; for manifests fix or drop the duplicated rows)"
        )

    out["label"] = _label_values(out["label"], ids)
    out["split"] = _split_values(out["split"]) if "split" in out.columns else "train"
    for column in ("is_query", "is_gallery"):
        if column in out.columns:
            out[column] = _bool_values(out[column], column, ids, out["split"].tolist())
        else:
            out[column] = out["split"] != "train"
    out["group"] = _group_values(out["group"], ids) if "group" in out.columns else list(ids)

    straddling = out.groupby("group", sort=True)["split"].nunique()
    straddling = straddling[straddling > 1]
    if len(straddling):
        examples = {
            g: sorted(out.loc[out["group"] == g, "split"].unique()) for g in list(straddling.index)[:_SHOW]
        }
        raise DataError(
            f"{len(straddling)} group(s) straddle splits, e.g. {examples}; a group (product, patient) "
            "must sit in one split, or evaluation leaks training data: re-split with split_by_group()"
        )

    if check_files:
        where = None if root is None else f"the data root {os.path.abspath(os.fspath(root))!r}"
        check_record_files(out, resolved_against=where)

    metadata = [c for c in out.columns if c not in RECORD_COLUMNS]
    return out[[*RECORD_COLUMNS, *metadata]]


def path_values(series: pd.Series) -> list[str | None]:
    """The ``path`` column as ``str`` or ``None`` (empty text counts as no path)."""
    values: list[str | None] = []
    for value in series.tolist():
        if is_missing(value):
            values.append(None)
        elif isinstance(value, (str, os.PathLike)):
            text = os.fspath(value)
            values.append(text if text != "" else None)
        else:
            raise DataError(
                f"the path column must hold strings, got a {type(value).__name__} ({value!r}); "
                "write paths as text"
            )
    return values


def _image_values(series: pd.Series, df: pd.DataFrame) -> list[bytes | np.ndarray | None]:
    values: list[bytes | np.ndarray | None] = []
    for row, value in enumerate(series.tolist()):
        if isinstance(value, np.ndarray):
            values.append(value)
        elif isinstance(value, (bytes, bytearray, memoryview)):
            values.append(bytes(value) if len(value) else None)
        elif is_missing(value):
            values.append(None)
        else:
            where = f"id {df['id'].iloc[row]!r}" if "id" in df.columns else f"row {row}"
            hint = ""
            if type(value).__module__.startswith("PIL"):
                hint = "; convert PIL images with np.asarray(img.convert('RGB'))"
            raise DataError(
                f"the image column must hold encoded bytes or numpy arrays, got a "
                f"{type(value).__name__} at {where}{hint}"
            )
    return values


def _id_values(series: pd.Series) -> list[str]:
    ids: list[str] = []
    empty: list[int] = []
    for row, value in enumerate(series.tolist()):
        if is_missing(value) or (isinstance(value, str) and value == ""):
            empty.append(row)
            ids.append("")
        elif isinstance(value, (float, np.floating)) and float(value).is_integer():
            ids.append(str(int(value)))
        else:
            ids.append(str(value))
    if empty:
        raise DataError(f"{len(empty)} row(s) have an empty id, e.g. rows {few(empty)}; fill in the ids")
    return ids


def ids_from_paths(paths: Sequence[str | None]) -> list[str]:
    """Ids for a table without an ``id`` column: the paths as given, in POSIX form (every row needs one)."""
    without = [i for i, p in enumerate(paths) if p is None]
    if without:
        raise DataError(
            f"{len(without)} row(s) have no path, e.g. rows {few(without)}, and the table has no id column "
            "to name them; add an id column (ids default to the paths only when every row has one)"
        )
    return [Path(p).as_posix() for p in paths if p is not None]


def _resolve_paths(paths: Sequence[str | None], root: str | os.PathLike[str]) -> list[str | None]:
    root_abs = os.path.normpath(os.path.abspath(os.fspath(root)))
    resolved: list[str | None] = []
    escaping: list[str] = []
    for path in paths:
        if path is None:
            resolved.append(None)
            continue
        joined = path if os.path.isabs(path) else os.path.join(root_abs, path)
        norm = os.path.normpath(joined)
        if os.path.commonpath([root_abs, norm]) != root_abs:
            escaping.append(path)
        resolved.append(norm)
    if escaping:
        raise DataError(
            f"{len(escaping)} path(s) lead outside the data root {root_abs!r}, e.g. {few(escaping)}; "
            "use paths relative to the root without '..', or pass the folder that contains them all "
            "as root"
        )
    return resolved


def check_record_files(df: pd.DataFrame, *, resolved_against: str | None = None) -> None:
    """Check that every record without an in-memory image names a regular file that is there.

    Each problem is named for what it is: a missing file, a broken symbolic link, or something that is
    not a regular file (a folder, a FIFO, a socket, a device), which no decoder can read.

    Args:
        df: normalised records (``path`` and ``image`` columns).
        resolved_against: what relative paths were joined to before (e.g. ``"the manifest's folder
            '/data'"``), named in the message; ``None``: paths are as given, so relative ones are read
            from the working folder.

    Raises:
        DataError: counting each kind of problem, with examples, and the fix.
    """
    found: dict[str, list[str]] = {}
    to_check = df["path"][df["image"].isna() & df["path"].notna()]
    for path in to_check.tolist():
        kind = file_kind(path)
        if kind != "a regular file":
            found.setdefault(kind, []).append(path)
    if not found:
        return
    paths = [p for kind in found.values() for p in kind]
    if resolved_against is not None:
        where = f" (relative paths were resolved against {resolved_against})"
    elif any(not os.path.isabs(p) for p in paths):
        where = f" (relative paths are read from the working folder {os.getcwd()!r})"
    else:
        where = ""
    not_there = set(found) <= {"missing", "a broken symbolic link"}
    parts = [f"{len(items)} {_PLURAL.get(kind, kind)}, e.g. {few(items)}" for kind, items in found.items()]
    raise DataError(
        f"{len(paths)} of {len(to_check)} image file(s) "
        f"{'cannot be found' if not_there else 'cannot be read as image files'}{where}: {'; '.join(parts)}; "
        "fix the paths or the data root, or drop these rows"
    )


_KINDS = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)
_PLURAL = {
    "a broken symbolic link": "broken symbolic link(s)",
    "a folder": "folder(s), not image files",
    "a FIFO (named pipe)": "FIFO(s) (named pipes), not regular files",
    "a socket": "socket(s), not regular files",
    "a character device": "character device(s), not regular files",
    "a block device": "block device(s), not regular files",
    "a special file": "special file(s), not regular files",
}


def file_kind(path: str | os.PathLike[str]) -> str:
    """What ``path`` is, in words for a message: ``"a regular file"``, ``"missing"``, ``"a folder"``,
    ``"a FIFO (named pipe)"``, ``"a broken symbolic link"``, ... It never opens the file (opening a
    FIFO would block until someone writes to it).
    """
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "a broken symbolic link" if os.path.islink(path) else "missing"
    except OSError as exc:  # permission denied on a folder on the way, a symbolic link loop, ...
        return f"unreachable ({exc.strerror or type(exc).__name__})"
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return "a special file"


def _label_kind(value: Any) -> str:
    if isinstance(value, str):
        return "str"
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (int, np.integer)):
        return "int"
    if isinstance(value, (float, np.floating)):
        return "int" if float(value).is_integer() else "float"
    return type(value).__name__


def _label_text(value: Any) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))  # 3.0 from a CSV column with gaps means class 3
    if isinstance(value, np.generic):
        return str(value.item())
    return str(value)


def _label_values(series: pd.Series, ids: Sequence[str]) -> list[str]:
    values = series.tolist()
    empty = [ids[i] for i, v in enumerate(values) if is_missing(v) or (isinstance(v, str) and not v)]
    if empty:
        raise DataError(
            f"{len(empty)} row(s) have no label, e.g. ids {few(empty)}; label every image or drop "
            "the unlabelled rows"
        )
    kinds = sorted({_label_kind(v) for v in values})
    if len(kinds) > 1:
        logger.warning(
            "labels mix types %s; converting all to str, so e.g. 1 and '1' become the same class; "
            "store labels as text to make this explicit",
            kinds,
        )
    return [_label_text(v) for v in values]


def _split_values(series: pd.Series) -> list[str]:
    result: list[str] = []
    unknown: dict[str, int] = {}
    aliased: set[str] = set()
    for value in series.tolist():
        text = "" if is_missing(value) else str(value).strip().lower()
        if text in SPLIT_ALIASES:
            aliased.add(text)
            text = SPLIT_ALIASES[text]
        if text not in SPLITS:
            shown = "<empty>" if is_missing(value) or str(value).strip() == "" else str(value)
            unknown[shown] = unknown.get(shown, 0) + 1
        result.append(text)
    if unknown:
        raise DataError(
            f"unknown split value(s) {unknown} (value: count); allowed: {list(SPLITS)} "
            f"(and the aliases {sorted(SPLIT_ALIASES)} for 'val'); fix the split column or drop it to "
            "put everything in 'train'"
        )
    if aliased:
        logger.info("split names %s were read as 'val'", sorted(aliased))
    return result


def _bool_values(series: pd.Series, column: str, ids: Sequence[str], splits: Sequence[str]) -> list[bool]:
    """Read a flag column; a blank cell on a ``train`` row is ``False`` (OML manifests leave them empty).

    In ``val``/``test`` a blank stays an error: there the flags decide what is measured, and guessing
    either way would change the result without a word.
    """
    result: list[bool] = []
    bad: list[tuple[str, Any]] = []
    blank: list[str] = []
    for row, value in enumerate(series.tolist()):
        if isinstance(value, (bool, np.bool_)):
            result.append(bool(value))
            continue
        if (
            isinstance(value, (int, float, np.integer, np.floating))
            and not is_missing(value)
            and value in (0, 1)
        ):
            result.append(bool(value))
            continue
        text = str(value).strip().lower() if isinstance(value, str) else None
        if text in _TRUE:
            result.append(True)
        elif text in _FALSE:
            result.append(False)
        elif is_missing(value) or text == "":
            result.append(False)
            if splits[row] != "train":
                blank.append(ids[row])
        else:
            bad.append((ids[row], value))
            result.append(False)
    if bad:
        raise DataError(
            f"{column} must be true/false, got {len(bad)} other value(s), e.g. (id, value) {few(bad)}; "
            "use True/False, yes/no or 1/0"
        )
    if blank:
        raise DataError(
            f"{column} is blank on {len(blank)} val/test row(s), e.g. ids {few(blank)}; blanks are read as "
            "false only on train rows: fill in true/false for evaluation rows, or drop the is_query and "
            "is_gallery columns to make every val/test image a query and a gallery item (all-vs-all)"
        )
    return result


def _group_values(series: pd.Series, ids: Sequence[str]) -> list[str]:
    return [ids[i] if is_missing(v) or v == "" else _label_text(v) for i, v in enumerate(series.tolist())]


def _warn_about_retrieval(df: pd.DataFrame) -> None:
    for split in SPLITS:
        rows = df[df["split"] == split]
        if len(rows) == 0:
            continue
        counts = rows["label"].value_counts()
        single = sorted(counts.index[counts == 1].tolist())
        if single:
            logger.warning(
                "%d of %d class(es) in split %r have a single image, e.g. %s; retrieval and PK "
                "sampling need at least 2 images per class (these images can only be distractors)",
                len(single),
                len(counts),
                split,
                few(single),
            )
        if split != "train":
            if not rows["is_query"].any():
                logger.warning("split %r has no queries; call assign_query_gallery()", split)
            if not rows["is_gallery"].any():
                logger.warning("split %r has no gallery items; call assign_query_gallery()", split)


def check_retrievable(df: pd.DataFrame, split: Split | str) -> int:
    """Check that retrieval evaluation on ``split`` is possible and return how many queries can score.

    A query can score when the gallery holds another record (a different ``id``) with its label.

    Returns:
        The number of queries that have at least one positive in the gallery (a warning is logged
        when some have none).

    Raises:
        DataError: the split has no rows, no queries or no gallery, or no query has a positive.
    """
    require_columns(df, ("id", "label", "split", "is_query", "is_gallery"), "check_retrievable")
    rows = df[df["split"] == split]
    if len(rows) == 0:
        present = sorted(df["split"].unique().tolist())
        raise DataError(f"split {split!r} has no records; splits present: {present}")
    queries = rows[rows["is_query"].astype(bool)]
    gallery = rows[rows["is_gallery"].astype(bool)]
    if len(queries) == 0 or len(gallery) == 0:
        raise DataError(
            f"split {split!r} has {len(queries)} queries and {len(gallery)} gallery items; retrieval "
            "needs both: call assign_query_gallery(df, split=...)"
        )
    per_label = gallery["label"].value_counts()
    available = queries["label"].map(per_label).fillna(0).to_numpy(dtype=np.int64, copy=True)
    available -= queries["is_gallery"].astype(bool).to_numpy(dtype=np.int64)  # a query never matches itself
    scoring = int((available > 0).sum())
    if scoring == 0:
        raise DataError(
            f"no query in split {split!r} has a positive in the gallery ({len(queries)} queries, "
            f"{len(gallery)} gallery items, {rows['label'].nunique()} classes); every class needs at "
            "least 2 images in the split, one of them in the gallery"
        )
    if scoring < len(queries):
        logger.warning(
            "%d of %d queries in split %r have no positive in the gallery and score zero",
            len(queries) - scoring,
            len(queries),
            split,
        )
    return scoring


def require_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """Refuse a table that is not a DataFrame or lacks ``columns``, naming ``what`` needed them."""
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"{what} needs a record DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(
            f"{what} needs column(s) {missing}; received {list(df.columns)}; pass the output of "
            "validate_records() or a reader"
        )

