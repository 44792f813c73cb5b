"""Image folders with one sub-folder per class (the ``ImageFolder`` layout) as records."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from deepfeat.finetune.data.contract import few, file_kind, validate_records
from deepfeat.finetune.data.images import IMAGE_EXTENSIONS
from deepfeat.finetune.errors import DataError

__all__ = ["read_image_folder"]

logger = logging.getLogger(__name__)


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
        kind = file_kind(base)
        raise DataError(
            f"{os.fspath(root)!r} is {'a file' if kind == 'a regular file' else kind}, not a folder; pass a "
            "folder with one sub-folder per class, or use read_manifest() for a CSV/Parquet manifest"
        )
    base = base.absolute()
    wanted = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}

    loose = [p.name for p in base.iterdir() if p.is_file() and not p.name.startswith(".")]
    if loose:
        logger.warning(
            "ignoring %d file(s) directly in %s, e.g. %s: images must be in one sub-folder per class",
            len(loose),
            base,
            few(sorted(loose)),
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

