"""The record contract: one ``pandas.DataFrame`` row per image, and the readers that produce it.

Every data source (an image folder, a CSV/Parquet manifest, a Hugging Face ``datasets`` dataset,
Fashion-MNIST) is turned into the same table, OML-style (see ``docs/contracts.md``):

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

Retrieval protocols (:func:`assign_query_gallery`): ``"all_vs_all"`` makes every image of a split
both a query and a gallery item, and a query is never matched against itself (the leave-one-out
protocol used for CUB-200, Cars-196 and Stanford Online Products in OML and most metric-learning
papers); ``"holdout"`` makes a fraction of each class queries and the rest the gallery, like a
deployed search where the gallery is indexed and queries are new images.
"""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, cast, get_args

import numpy as np
import pandas as pd

from deepfeat.finetune.data.images import IMAGE_EXTENSIONS
from deepfeat.finetune.errors import DataError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "OPTIONAL_COLUMNS",
    "RECORD_COLUMNS",
    "SPLITS",
    "QueryGalleryMode",
    "Split",
    "assign_query_gallery",
    "check_retrievable",
    "read_fashion_mnist",
    "read_hf_dataset",
    "read_image_folder",
    "read_manifest",
    "read_records",
    "split_by_class",
    "split_by_group",
    "validate_records",
    "write_manifest",
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

#: Where the Debian package ``dataset-fashion-mnist`` installs its files.
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
#: Fashion-MNIST class names, by class index (Xiao et al. 2017, https://arxiv.org/abs/1708.07747).
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# other spellings of split names seen in the wild (Hugging Face uses "validation")
_SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}
_TRUE = frozenset({"true", "t", "yes", "y", "1"})
_FALSE = frozenset({"false", "f", "no", "n", "0"})
_SHOW = 5  # how many offending values an error message lists


def _few(values: Iterable[Any], n: int = _SHOW) -> str:
    items = list(values)
    shown = ", ".join(repr(v) for v in items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}]"


def _is_missing(value: Any) -> bool:
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
    out = _normalise(df, root=root, check_files=check_files)
    _warn_about_retrieval(out)
    return out


def _normalise(df: pd.DataFrame, *, root: str | os.PathLike[str] | None, check_files: bool) -> pd.DataFrame:
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

    given_paths = _path_values(out["path"]) if "path" in out.columns else [None] * len(out)
    images = _image_values(out["image"], out) if "image" in out.columns else [None] * len(out)

    ids = _id_values(out["id"]) if "id" in out.columns else _ids_from_paths(given_paths)
    paths = _resolve_paths(given_paths, root) if root is not None else given_paths
    bare = [i for i, (p, im) in enumerate(zip(paths, images, strict=True)) if p is None and im is None]
    if bare:
        raise DataError(
            f"{len(bare)} row(s) have neither a path nor an in-memory image, e.g. ids "
            f"{_few(ids[i] for i in bare)}; fill in the path column or drop these rows"
        )
    out["id"] = ids
    out["path"] = pd.Series(paths, dtype=object, index=out.index)
    out["image"] = pd.Series(images, dtype=object, index=out.index)

    duplicated_ids = out["id"][out["id"].duplicated(keep=False)]
    if len(duplicated_ids):
        uniq = list(dict.fromkeys(duplicated_ids))
        raise DataError(
            f"{len(uniq)} id(s) occur more than once, e.g. {_few(uniq)}; ids must be unique "
            "(for folders they are relative paths; for manifests fix or drop the duplicated rows)"
        )

    out["label"] = _label_values(out["label"], ids)
    out["split"] = _split_values(out["split"]) if "split" in out.columns else "train"
    for column in ("is_query", "is_gallery"):
        if column in out.columns:
            out[column] = _bool_values(out[column], column, ids)
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
        _check_files(out, root)

    metadata = [c for c in out.columns if c not in RECORD_COLUMNS]
    return out[[*RECORD_COLUMNS, *metadata]]


def _path_values(series: pd.Series) -> list[str | None]:
    values: list[str | None] = []
    for value in series.tolist():
        if _is_missing(value):
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
        elif _is_missing(value):
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
        if _is_missing(value) or (isinstance(value, str) and value == ""):
            empty.append(row)
            ids.append("")
        elif isinstance(value, (float, np.floating)) and float(value).is_integer():
            ids.append(str(int(value)))
        else:
            ids.append(str(value))
    if empty:
        raise DataError(f"{len(empty)} row(s) have an empty id, e.g. rows {_few(empty)}; fill in the ids")
    return ids


def _ids_from_paths(paths: Sequence[str | None]) -> list[str]:
    without = [i for i, p in enumerate(paths) if p is None]
    if without:
        raise DataError(
            f"{len(without)} row(s) have no path, e.g. rows {_few(without)}, and the table has no id column "
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
            f"{len(escaping)} path(s) lead outside the data root {root_abs!r}, e.g. {_few(escaping)}; "
            "use paths relative to the root without '..', or pass the folder that contains them all "
            "as root"
        )
    return resolved


def _check_files(df: pd.DataFrame, root: str | os.PathLike[str] | None) -> None:
    missing: list[str] = []
    broken: list[str] = []
    to_check = df["path"][df["image"].isna() & df["path"].notna()]
    for path in to_check.tolist():
        if os.path.isfile(path):
            continue
        (broken if os.path.islink(path) else missing).append(path)
    problems = len(missing) + len(broken)
    if problems:
        where = f" (relative paths are read from {os.getcwd()!r})" if root is None else ""
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing, e.g. {_few(missing)}")
        if broken:
            parts.append(f"{len(broken)} broken symbolic link(s), e.g. {_few(broken)}")
        raise DataError(
            f"{problems} of {len(to_check)} image file(s) cannot be found{where}: {'; '.join(parts)}; "
            "fix the paths or the data root, or drop these rows"
        )


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
    empty = [ids[i] for i, v in enumerate(values) if _is_missing(v) or (isinstance(v, str) and not v)]
    if empty:
        raise DataError(
            f"{len(empty)} row(s) have no label, e.g. ids {_few(empty)}; label every image or drop "
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
        text = "" if _is_missing(value) else str(value).strip().lower()
        if text in _SPLIT_ALIASES:
            aliased.add(text)
            text = _SPLIT_ALIASES[text]
        if text not in SPLITS:
            shown = "<empty>" if _is_missing(value) or str(value).strip() == "" else str(value)
            unknown[shown] = unknown.get(shown, 0) + 1
        result.append(text)
    if unknown:
        raise DataError(
            f"unknown split value(s) {unknown} (value: count); allowed: {list(SPLITS)} "
            f"(and the aliases {sorted(_SPLIT_ALIASES)} for 'val'); fix the split column or drop it to "
            "put everything in 'train'"
        )
    if aliased:
        logger.info("split names %s were read as 'val'", sorted(aliased))
    return result


def _bool_values(series: pd.Series, column: str, ids: Sequence[str]) -> list[bool]:
    result: list[bool] = []
    bad: list[tuple[str, Any]] = []
    for row, value in enumerate(series.tolist()):
        if isinstance(value, (bool, np.bool_)):
            result.append(bool(value))
            continue
        if (
            isinstance(value, (int, float, np.integer, np.floating))
            and not _is_missing(value)
            and value in (0, 1)
        ):
            result.append(bool(value))
            continue
        text = str(value).strip().lower() if isinstance(value, str) else None
        if text in _TRUE:
            result.append(True)
        elif text in _FALSE:
            result.append(False)
        else:
            bad.append((ids[row], value))
            result.append(False)
    if bad:
        raise DataError(
            f"{column} must be true/false, got {len(bad)} other value(s), e.g. (id, value) {_few(bad)}; "
            "use True/False, yes/no or 1/0"
        )
    return result


def _group_values(series: pd.Series, ids: Sequence[str]) -> list[str]:
    return [ids[i] if _is_missing(v) or v == "" else _label_text(v) for i, v in enumerate(series.tolist())]


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
                _few(single),
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
    _require(df, ("id", "label", "split", "is_query", "is_gallery"), "check_retrievable")
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


def _require(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"{what} needs a record DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(
            f"{what} needs column(s) {missing}; received {list(df.columns)}; pass the output of "
            "validate_records() or a reader"
        )


# --------------------------------------------------------------------------------------------------
# readers


def read_image_folder(
    root: str | os.PathLike[str],
    *,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
    check_files: bool = True,
) -> pd.DataFrame:
    """Read a folder with one sub-folder per class (the ``ImageFolder`` layout).

    Images may sit in nested folders below their class folder. Hidden files and folders (a leading
    ``.``) are skipped; files directly in ``root`` are ignored with a warning. Ids are the paths
    relative to ``root`` in POSIX form (spaces, quotes and non-ASCII characters are kept as they are),
    paths are absolute, every record is in split ``"train"``.

    Args:
        root: the folder holding the class folders.
        extensions: file name endings to read (case-insensitive, with or without the dot).
        check_files: refuse the folder when a listed file cannot be found (a broken symbolic link);
            ``False`` keeps such records, so that a run with ``on_error='skip'`` reports each of them.

    Raises:
        DataError: ``root`` is missing or not a folder, or holds no image in a class folder.
    """
    base = Path(root)
    if not base.exists():
        raise DataError(f"image folder {os.fspath(root)!r} does not exist; check the path")
    if not base.is_dir():
        raise DataError(
            f"{os.fspath(root)!r} is a file, not a folder; pass a folder with one sub-folder per class, "
            "or use read_manifest() for a CSV/Parquet manifest"
        )
    base = base.absolute()
    wanted = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}

    loose = [p.name for p in base.iterdir() if p.is_file() and not p.name.startswith(".")]
    if loose:
        logger.warning(
            "ignoring %d file(s) directly in %s, e.g. %s: images must be in one sub-folder per class",
            len(loose),
            base,
            _few(sorted(loose)),
        )
    classes = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    rows: list[dict[str, Any]] = []
    skipped = 0
    for class_dir in classes:
        found = 0
        for folder, dirnames, filenames in os.walk(class_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                if filename.startswith("."):
                    continue
                if os.path.splitext(filename)[1].lower() not in wanted:
                    skipped += 1
                    continue
                path = Path(folder) / filename
                rows.append(
                    {"id": path.relative_to(base).as_posix(), "path": str(path), "label": class_dir.name}
                )
                found += 1
        if found == 0:
            logger.warning(
                "class folder %r holds no image with extensions %s", class_dir.name, sorted(wanted)
            )
    if skipped:
        logger.info("skipped %d file(s) without an image extension under %s", skipped, base)
    if not rows:
        raise DataError(
            f"no images with extensions {sorted(wanted)} found in class sub-folders of {str(base)!r} "
            f"(found {len(classes)} sub-folder(s)); the layout is root/<class>/<image>"
        )
    logger.info("read %d image(s) in %d class(es) from %s", len(rows), len(classes), base)
    return validate_records(pd.DataFrame(rows), root=base, check_files=check_files)


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
        raise DataError(f"manifest {os.fspath(path)!r} does not exist or is not a file")
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
        given = _path_values(df["path"])
        if "id" not in df.columns:
            df["id"] = _ids_from_paths(given)
        if root is None:
            base = str(file.absolute().parent)
            df["path"] = pd.Series(
                [None if p is None else os.path.normpath(os.path.join(base, p)) for p in given],
                dtype=object,
                index=df.index,
            )
    logger.info("read %d record(s) from %s", len(df), file)
    return validate_records(df, root=root, check_files=check_files)


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

    Raises:
        DataError: the path is not a saved dataset, a column is missing, or labels are missing (-1).
    """
    try:
        import datasets
    except ImportError as exc:  # a core dependency; say what to do if it is gone
        raise DataError("read_hf_dataset needs the 'datasets' package: pip install datasets") from exc

    source = ds_or_path
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
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
            _hf_frame(part, image_column, label_column, split_name=str(name)) for name, part in source.items()
        ]
        if not parts:
            raise DataError("the DatasetDict holds no splits")
        df = pd.concat(parts, ignore_index=True)
    elif isinstance(source, datasets.Dataset):
        name = str(source.split) if source.split is not None else None
        df = _hf_frame(source, image_column, label_column, split_name=name)
    else:
        raise DataError(
            f"read_hf_dataset needs a datasets.Dataset, a DatasetDict or a save_to_disk folder, got "
            f"{type(source).__name__}"
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
    prefix = _SPLIT_ALIASES.get((split_name or "").lower(), (split_name or "").lower())
    split = prefix if prefix in SPLITS else "train"

    paths: list[str | None] = [None] * n
    images: list[bytes | np.ndarray | None]
    image_feature = features[image_column]
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

    label_feature = features[label_column]
    raw_labels = list(ds[label_column])
    if isinstance(label_feature, datasets.ClassLabel):
        unlabelled = sum(1 for v in raw_labels if v is None or v < 0)
        if unlabelled:
            raise DataError(
                f"{unlabelled} row(s) have label -1 (no label) in column {label_column!r}; drop them, "
                "e.g. ds.filter(lambda r: r['label'] >= 0)"
            )
        labels: list[Any] = label_feature.int2str(raw_labels)
    else:
        labels = raw_labels

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


def read_fashion_mnist(
    root: str | os.PathLike[str] = FASHION_MNIST_ROOT,
    *,
    subset: Literal["all", "train", "test"] = "all",
    limit_per_class: int | None = None,
) -> pd.DataFrame:
    """Read Fashion-MNIST (Xiao et al. 2017) from its idx ``.gz`` files into records.

    Images are ``(28, 28)`` uint8 arrays in the ``image`` column (no files are written), labels are
    the class names of :data:`FASHION_MNIST_CLASSES`, ids look like ``fmnist-train-000123`` (the
    index in the official file), ``split`` is the official ``train``/``test`` split and the metadata
    column ``class_index`` keeps the numeric label.

    Args:
        root: folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.
        subset: ``"train"`` (60,000 images), ``"test"`` (10,000) or ``"all"``.
        limit_per_class: keep only the first N images of each class in each subset (file order).

    Raises:
        DataError: the files are missing (install ``dataset-fashion-mnist``) or corrupt.
    """
    if subset not in ("all", "train", "test"):
        raise DataError(f"subset must be 'all', 'train' or 'test', got {subset!r}")
    if limit_per_class is not None and limit_per_class < 1:
        raise DataError(f"limit_per_class must be >= 1 or None, got {limit_per_class}")
    base = Path(root)
    wanted: list[Literal["train", "test"]] = ["train", "test"] if subset == "all" else [subset]
    frames = []
    for part in wanted:
        stem = "train" if part == "train" else "t10k"
        image_file = base / f"{stem}-images-idx3-ubyte.gz"
        label_file = base / f"{stem}-labels-idx1-ubyte.gz"
        for file in (image_file, label_file):
            if not file.is_file():
                raise DataError(
                    f"Fashion-MNIST file {str(file)!r} not found; install the data with "
                    "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or pass the folder "
                    "holding the idx .gz files as root"
                )
        images = _read_idx(image_file, magic=2051)
        labels = _read_idx(label_file, magic=2049)
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"Fashion-MNIST {part}: {images.shape[0]} images but {labels.shape[0]} labels; the files "
                "are corrupt, reinstall dataset-fashion-mnist"
            )
        if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"Fashion-MNIST {part}: label {int(labels.max())} out of range; files corrupt")
        index = np.arange(len(labels))
        if limit_per_class is not None:
            keep = np.concatenate([index[labels == c][:limit_per_class] for c in range(10)])
            index = np.sort(keep)
        frames.append(
            pd.DataFrame(
                {
                    "id": [f"fmnist-{part}-{i:06d}" for i in index],
                    "image": pd.Series(list(images[index]), dtype=object),
                    "label": [FASHION_MNIST_CLASSES[c] for c in labels[index]],
                    "split": part,
                    "class_index": labels[index].astype(np.int64),
                }
            )
        )
    df = pd.concat(frames, ignore_index=True)
    logger.info("read %d Fashion-MNIST image(s) (%s) from %s", len(df), subset, base)
    return validate_records(df, check_files=False)


def _read_idx(file: Path, *, magic: int) -> np.ndarray:
    try:
        with gzip.open(file, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {str(file)!r}: {exc}; reinstall dataset-fashion-mnist") from exc
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else -1
    if found != magic:
        raise DataError(
            f"{str(file)!r} is not an idx file (magic {found}, expected {magic}); corrupt download"
        )
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise DataError(
            f"{str(file)!r} holds {len(data) - offset} bytes of data, expected {expected} for shape {dims}; "
            "the file is truncated, reinstall dataset-fashion-mnist"
        )
    # a writable copy: torch.from_numpy warns about read-only arrays and in-place edits would fail
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims).copy()


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
        raise DataError(
            f"data source {os.fspath(source)!r} does not exist; pass an image folder, a .csv/.parquet "
            "manifest, a saved Hugging Face dataset folder or 'fashion-mnist'"
        )
    if type(source).__module__.startswith("datasets"):
        return read_hf_dataset(source, **kwargs)
    raise DataError(f"unsupported data source of type {type(source).__name__}")


# --------------------------------------------------------------------------------------------------
# splits


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or any(not np.isfinite(f) or f < 0 for f in values) or abs(sum(values) - 1) > 1e-6:
        raise DataError(
            f"fractions must be three non-negative numbers (train, val, test) that sum to 1, got "
            f"{tuple(fractions)}"
        )
    return cast("tuple[float, float, float]", values)


def _allocate(total: int, fractions: tuple[float, float, float]) -> list[int]:
    """Split ``total`` items by largest remainder, giving every non-zero fraction at least one."""
    exact = [f * total for f in fractions]
    counts = [int(np.floor(e)) for e in exact]
    order = sorted(range(3), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    for i in range(3):
        if fractions[i] > 0 and counts[i] == 0:
            donor = max(range(3), key=lambda j: counts[j])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] += 1
    return counts


def _reset_query_gallery(df: pd.DataFrame) -> pd.DataFrame:
    evaluation = df["split"] != "train"
    df["is_query"] = evaluation
    df["is_gallery"] = evaluation
    return df


def _warn_empty_splits(df: pd.DataFrame, fractions: tuple[float, float, float], unit: str) -> None:
    for name, fraction in zip(SPLITS, fractions, strict=True):
        if fraction > 0 and not (df["split"] == name).any():
            logger.warning(
                "split %r is empty although its fraction is %.3g: too few %s to share out",
                name,
                fraction,
                unit,
            )


def split_by_class(
    df: pd.DataFrame,
    *,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> pd.DataFrame:
    """Assign whole classes to train/val/test, so that evaluation measures retrieval of unseen classes.

    This is the zero-shot protocol of CUB-200, Cars-196 and Stanford Online Products. Fractions count
    classes, not images (largest remainder; every split with a non-zero fraction gets at least one
    class when there are enough). Classes linked by a shared ``group`` move together, so groups never
    straddle splits. ``is_query``/``is_gallery`` are reset to all-vs-all in val/test.

    Args:
        df: validated records.
        fractions: (train, val, test) shares of the classes, summing to 1.
        seed: the same seed and records always give the same split.

    Returns:
        A copy with ``split``, ``is_query`` and ``is_gallery`` reassigned.
    """
    parts = _check_fractions(fractions)
    _require(df, ("id", "label", "group"), "split_by_class")
    out = df.copy()
    labels = sorted(out["label"].unique().tolist())
    parent = {label: label for label in labels}

    def find(label: str) -> str:
        while parent[label] != label:
            parent[label] = parent[parent[label]]
            label = parent[label]
        return label

    per_group = out.groupby("group", sort=True)["label"].unique()
    for linked in per_group[per_group.map(len) > 1].tolist():
        first = find(linked[0])
        for other in linked[1:]:
            parent[find(other)] = first
    components: dict[str, list[str]] = {}
    for label in labels:
        components.setdefault(find(label), []).append(label)
    ordered = sorted(components.values())
    if len(ordered) < len(labels):
        logger.info("%d classes share groups and form %d blocks kept together", len(labels), len(ordered))

    counts = _allocate(len(labels), parts)
    slots = [name for name, count in zip(SPLITS, counts, strict=True) for _ in range(count)]
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    position = 0
    for block in (ordered[i] for i in rng.permutation(len(ordered))):
        name = slots[min(position, len(slots) - 1)]
        for label in block:
            assignment[label] = name
        position += len(block)
    out["split"] = out["label"].map(assignment)
    out = _reset_query_gallery(out)
    _warn_empty_splits(out, parts, "classes")
    logger.info(
        "split_by_class: %s classes in train/val/test",
        [int(out.loc[out["split"] == s, "label"].nunique()) for s in SPLITS],
    )
    return out


def split_by_group(
    df: pd.DataFrame,
    *,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> pd.DataFrame:
    """Split the images of every class at random by ``fractions``, keeping each ``group`` in one split.

    Classes are shared by all splits (the seen-classes protocol). Within a class, groups are
    shuffled and laid end to end by image count; a group goes to the split its midpoint falls in,
    so shares are met as closely as whole groups allow. A group spanning several classes is placed
    with its most frequent class. ``is_query``/``is_gallery`` are reset to all-vs-all in val/test.

    Args:
        df: validated records.
        fractions: (train, val, test) shares of each class's images, summing to 1.
        seed: the same seed and records always give the same split.

    Returns:
        A copy with ``split``, ``is_query`` and ``is_gallery`` reassigned.
    """
    parts = _check_fractions(fractions)
    _require(df, ("id", "label", "group"), "split_by_group")
    out = df.copy()
    sizes = out.groupby(["group", "label"], sort=True).size().reset_index(name="n")
    # a group's home class: its most frequent label, ties to the smallest label
    sizes = sizes.sort_values(["group", "n", "label"], ascending=[True, False, True], kind="stable")
    home = sizes.drop_duplicates("group", keep="first").set_index("group")["label"]
    group_size = out.groupby("group", sort=True).size()
    bounds = np.cumsum(parts)
    bounds[-1] = np.inf  # float round-off must not push the last midpoint past the end
    rng = np.random.default_rng(seed)
    assignment: dict[Hashable, str] = {}
    for _label, groups in home.groupby(home, sort=True):
        names = sorted(groups.index.tolist())
        weights = group_size.loc[names].to_numpy(dtype=np.float64)
        order = rng.permutation(len(names))
        ends = np.cumsum(weights[order])
        midpoints = (ends - weights[order] / 2.0) / ends[-1]
        for position, midpoint in zip(order, midpoints, strict=True):
            assignment[names[position]] = SPLITS[int(np.searchsorted(bounds, midpoint, side="right"))]
    out["split"] = out["group"].map(assignment)
    out = _reset_query_gallery(out)
    _warn_empty_splits(out, parts, "groups")
    logger.info(
        "split_by_group: %s images in train/val/test", [int((out["split"] == s).sum()) for s in SPLITS]
    )
    return out


def assign_query_gallery(
    df: pd.DataFrame,
    *,
    split: Split | str = "val",
    query_fraction: float = 0.5,
    seed: int = 0,
    mode: QueryGalleryMode = "all_vs_all",
) -> pd.DataFrame:
    """Mark the queries and the gallery of one split for retrieval evaluation.

    ``"all_vs_all"``: every image is a query and a gallery item; a query is never matched with
    itself (leave-one-out). ``"holdout"``: in each class, ``round(n * query_fraction)`` images (at
    least one, and at least one fewer than ``n``) become queries and the rest gallery; a class with
    a single image goes to the gallery as a distractor. Rows of other splits are unchanged.

    Args:
        df: validated records.
        split: the split to mark.
        query_fraction: share of each class used as queries in ``"holdout"`` mode, in (0, 1).
        seed: the same seed and records always give the same choice.
        mode: ``"all_vs_all"`` or ``"holdout"``.

    Returns:
        A copy with ``is_query`` and ``is_gallery`` set for ``split``.

    Raises:
        DataError: the split has no records, or the mode or fraction is invalid.
    """
    _require(df, ("id", "label", "split"), "assign_query_gallery")
    if mode not in ("all_vs_all", "holdout"):
        raise DataError(f"mode must be 'all_vs_all' or 'holdout', got {mode!r}")
    if mode == "holdout" and not 0 < query_fraction < 1:
        raise DataError(f"query_fraction must be between 0 and 1 (exclusive), got {query_fraction}")
    out = df.copy()
    mask = (out["split"] == split).to_numpy()
    if not mask.any():
        raise DataError(
            f"split {split!r} has no records; splits present: {sorted(out['split'].unique().tolist())}; "
            "assign splits first with split_by_class() or split_by_group()"
        )
    default = (out["split"] != "train").to_numpy(dtype=bool, copy=True)
    is_query = out["is_query"].to_numpy(dtype=bool, copy=True) if "is_query" in out else default.copy()
    is_gallery = out["is_gallery"].to_numpy(dtype=bool, copy=True) if "is_gallery" in out else default
    if mode == "all_vs_all":
        is_query[mask] = True
        is_gallery[mask] = True
    else:
        rng = np.random.default_rng(seed)
        rows = np.flatnonzero(mask)
        labels = out["label"].to_numpy()[rows]
        singles = 0
        for label in sorted(set(labels.tolist())):
            members = rows[labels == label]
            members = members[rng.permutation(len(members))]
            if len(members) < 2:
                singles += 1
                n_query = 0
            else:
                n_query = min(max(1, round(len(members) * query_fraction)), len(members) - 1)
            is_query[members] = False
            is_gallery[members] = True
            is_query[members[:n_query]] = True
            is_gallery[members[:n_query]] = False
        if singles:
            logger.info("%d single-image class(es) in split %r are gallery-only distractors", singles, split)
    out["is_query"] = is_query
    out["is_gallery"] = is_gallery
    logger.info(
        "split %r (%s): %d queries, %d gallery items",
        split,
        mode,
        int(is_query[mask].sum()),
        int(is_gallery[mask].sum()),
    )
    return out


# --------------------------------------------------------------------------------------------------
# writing


def write_manifest(
    df: pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    relative_paths: bool = False,
) -> Path:
    """Write records to a CSV or Parquet manifest (chosen by the suffix), atomically.

    CSV cannot hold images: the ``image`` column is dropped, which is refused when some rows hold
    their image only in memory (no ``path``). Parquet keeps encoded bytes as they are and stores
    arrays as lossless PNG bytes (uint16 arrays as 16-bit PNG), which :func:`load_image` decodes to
    the same pixels.

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
    out = _normalise(df, root=None, check_files=False)
    in_memory = out["image"].notna()
    if suffix == ".csv":
        only_in_memory = in_memory & out["path"].isna()
        if only_in_memory.any():
            raise DataError(
                f"{int(only_in_memory.sum())} record(s) hold their image only in memory (no path), e.g. "
                f"{_few(out.loc[only_in_memory, 'id'])}; CSV cannot store images: write a .parquet "
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
    import io

    from PIL import Image

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


def sample_per_class(df: pd.DataFrame, n: int | None, *, seed: int = 0,
                     by: Sequence[str] = ("label",)) -> pd.DataFrame:
    """At most ``n`` random rows per class (per ``by`` combination), keeping the original row order.

    Deterministic for a seed; ``n=None`` returns ``df`` unchanged.
    """
    if not n:
        return df
    picked = df.sample(frac=1.0, random_state=seed).groupby(list(by), sort=False).head(n)
    return df.loc[df.index.isin(picked.index)]
