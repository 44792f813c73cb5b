"""Helpers shared by the recipes' actions: records and images, filters, fetches and searches.

The config (:mod:`deepfeat.recipes.config`) and the run (:mod:`deepfeat.recipes.engine`) live in their own
modules; their names are re-exported here for the actions' imports.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from deepfeat.finetune.errors import DataError, DeepfeatError

if TYPE_CHECKING:
    from deepfeat.connectors.client import MilvusConnector

log = logging.getLogger(__name__)

__all__ = [
    "CONFIG_DIR",
    "RECIPES",
    "CollectionOptions",
    "RecipeConfig",
    "RecipeContext",
    "RecipeInfo",
    "RecipeResult",
    "build_filter",
    "fetch_rows",
    "list_images",
    "list_recipes",
    "load_recipe",
    "milvus_literal",
    "pick_queries",
    "read_any",
    "record_image",
    "run_recipe",
    "search_each",
]

# The config and the run live in their own modules; re-exported here for the actions' imports.
from deepfeat.recipes.config import (  # noqa: E402
    CONFIG_DIR,
    RECIPES,
    CollectionOptions,
    RecipeConfig,
    RecipeInfo,
    list_recipes,
    load_recipe,
)
from deepfeat.recipes.engine import RecipeContext, RecipeResult, run_recipe  # noqa: E402

# --------------------------------------------------------------------------------------------------
# records and images


def read_any(source: str | os.PathLike[str], *, label: str = "unlabelled") -> pd.DataFrame:
    """Records from any source ``read_records`` takes, or from a flat folder of images (one ``label``).

    A folder of loose images (no class sub-folders) is what an unlabelled collection looks like; its
    records all get ``label``.
    """
    from deepfeat.finetune.data.contract import validate_records
    from deepfeat.finetune.data.readers import read_records

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
    from deepfeat.finetune.data.images import IMAGE_EXTENSIONS

    path = Path(source)
    if path.is_file() and path.suffix.lower() in (".csv", ".parquet", ".pq"):
        from deepfeat.finetune.data.readers import read_manifest

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


def record_image(row: Mapping[str, Any] | pd.Series) -> np.ndarray | None:
    """A record's decoded image, or ``None`` when it cannot be read (pictures skip it)."""
    from deepfeat.finetune.data.dataset import record_source
    from deepfeat.finetune.data.images import load_image

    try:
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


# --------------------------------------------------------------------------------------------------
# filters and searches


def milvus_literal(value: Any) -> str:
    """A value as a Milvus expression literal; strings through the connector's :func:`quote_string` (quotes,
    backslashes and non-ASCII text are safe).

    Raises:
        DataError: a non-finite number, or a string with a control character Milvus cannot express.
    """
    from deepfeat.connectors.search import quote_string

    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        if not np.isfinite(value):
            raise DataError(f"cannot filter on the non-finite value {value!r}")
        return repr(float(value))
    return quote_string(str(value))


def build_filter(
    *clauses: str | None,
    equals: Mapping[str, Any] | None = None,
    not_equals: Mapping[str, Any] | None = None,
    ranges: Mapping[str, tuple[float | None, float | None]] | None = None,
) -> str | None:
    """A Milvus boolean expression: free ``clauses`` and field conditions, joined with ``and``.

    ``ranges`` maps a field to ``(low, high)`` (inclusive; ``None`` leaves that side open). Values are
    quoted by :func:`milvus_literal`, so ids and labels with quotes are safe. Returns ``None`` when empty.
    """
    parts = [f"({c})" for c in clauses if c]
    for name, value in (equals or {}).items():
        parts.append(f"{name} == {milvus_literal(value)}")
    for name, value in (not_equals or {}).items():
        parts.append(f"{name} != {milvus_literal(value)}")
    for name, (low, high) in (ranges or {}).items():
        if low is not None:
            parts.append(f"{name} >= {milvus_literal(float(low))}")
        if high is not None:
            parts.append(f"{name} <= {milvus_literal(float(high))}")
    return " and ".join(parts) or None


def fetch_rows(
    conn: MilvusConnector, collection: str, record_ids: Sequence[str], fields: Sequence[str] = ("group", "label")
) -> dict[str, dict[str, Any]]:
    """Stored rows of records by id (``pk``, ``record_id``, ``vector`` and ``fields``).

    Raises:
        DataError: some ids are not in the collection (named).
    """
    from deepfeat.connectors.collection import open_collection
    from deepfeat.connectors.schema import PK_FIELD, RECORD_ID_FIELD, VECTOR_FIELD

    spec = open_collection(conn, collection)
    unknown = [f for f in fields if f not in spec.field_names]
    if unknown:
        raise DataError(f"field(s) {unknown} are not in collection {collection!r}; it has {spec.field_names}")
    conn.ensure_loaded(spec.name)
    wanted = list(dict.fromkeys([PK_FIELD, RECORD_ID_FIELD, VECTOR_FIELD, *fields]))
    ids = [str(i) for i in record_ids]
    found: dict[str, dict[str, Any]] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        expr = f"{RECORD_ID_FIELD} in [{', '.join(milvus_literal(i) for i in chunk)}]"
        for row in conn.call("query", conn.client.query, collection, filter=expr, output_fields=wanted):
            found[str(row[RECORD_ID_FIELD])] = dict(row)
    missing = [i for i in ids if i not in found]
    if missing:
        raise DataError(
            f"record id(s) {missing[:5]} are not in collection {collection!r} ({len(missing)} missing); "
            f"ids are the records' 'id' column (for folders, the relative paths)"
        )
    return found


def search_each(
    conn: MilvusConnector,
    collection: str,
    record_ids: Sequence[str],
    *,
    top_k: int = 5,
    filter: str | None = None,
    same: Sequence[str] = (),
    exclude_own_group: bool = False,
    group_by: str | None = "group",
    output_fields: Sequence[str] | None = None,
    search_params: Mapping[str, Any] | None = None,
) -> list[list[dict[str, Any]]]:
    """One search per stored record, by its own vector, never returning the record itself.

    Args:
        filter: a Milvus expression every hit must satisfy.
        same: fields whose value a hit must share with its query (e.g. ``("modality", "body_part")``);
            a query without a value (``""``) is not restricted on that field.
        exclude_own_group: leave out every record of the query's own ``group`` (its patient, its product).
        group_by: one hit per value of this field (``None``: plain top-k).
        output_fields: fields in each hit (default: record_id, label, group, split, path and ``same``).
    """
    from deepfeat.connectors.schema import PK_FIELD, VECTOR_FIELD
    from deepfeat.connectors.search import search_vectors

    needed = list(dict.fromkeys(["group", *same]))
    rows = fetch_rows(conn, collection, record_ids, needed)
    fields = (
        list(output_fields)
        if output_fields is not None
        else list(dict.fromkeys(["record_id", "label", "group", "split", "path", *same]))
    )
    out: list[list[dict[str, Any]]] = []
    for rid in record_ids:
        row = rows[str(rid)]
        expr = build_filter(
            filter,
            not_equals={PK_FIELD: row[PK_FIELD], **({"group": row["group"]} if exclude_own_group else {})},
            equals={f: row[f] for f in same if row.get(f) not in (None, "")},
        )
        vector = np.asarray(row[VECTOR_FIELD], dtype=np.float32)[None, :]
        out.extend(
            search_vectors(
                conn,
                collection,
                vector,
                top_k=top_k,
                filter=expr,
                group_by=group_by,
                output_fields=fields,
                search_params=search_params,
            )
        )
    return out


def iter_collection(
    conn: MilvusConnector, collection: str, fields: Sequence[str], *, filter: str = ""
) -> Iterator[dict[str, Any]]:
    """Every row of a collection (``fields`` plus ``pk``), through a query iterator."""
    from deepfeat.connectors.collection import open_collection
    from deepfeat.connectors.schema import PK_FIELD, VECTOR_FIELD

    spec = open_collection(conn, collection)
    unknown = [f for f in fields if f not in (*spec.field_names, VECTOR_FIELD, PK_FIELD)]
    if unknown:
        raise DataError(f"field(s) {unknown} are not in collection {collection!r}; it has {spec.field_names}")
    yield from conn.iter_rows(spec.name, list(dict.fromkeys([PK_FIELD, *fields])), filter=filter)


def collection_frame(
    conn: MilvusConnector, collection: str, fields: Sequence[str] = ("record_id", "label", "path"), *, filter: str = ""
) -> tuple[pd.DataFrame, np.ndarray]:
    """All rows of a collection as (metadata table, float32 vectors (n, dim)), in key order.

    Raises:
        DataError: the collection (or the filter) holds no rows.
    """
    from deepfeat.connectors.schema import PK_FIELD, VECTOR_FIELD

    rows = sorted(
        iter_collection(conn, collection, [*fields, VECTOR_FIELD], filter=filter), key=lambda r: str(r[PK_FIELD])
    )
    if not rows:
        where = f" matching {filter!r}" if filter else ""
        raise DataError(f"collection {collection!r} holds no rows{where}; load embeddings first ('deepfeat load')")
    vectors = np.asarray([r[VECTOR_FIELD] for r in rows], dtype=np.float32)
    meta = pd.DataFrame([{k: v for k, v in r.items() if k != VECTOR_FIELD} for r in rows])
    return meta, vectors
