"""Row encoding: record tables and their vectors become the rows a collection upserts.

Vectors are checked (shape, dim, finite values: Milvus Lite accepts NaN silently) and every scalar
field is converted to its collection type, with string lengths checked in UTF-8 bytes, before anything
is written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from deepfeat.connectors.fields import (
    MODEL_VERSION_FIELD,
    PK_FIELD,
    RECORD_ID_FIELD,
    USER_VARCHAR_LENGTH,
    VECTOR_FIELD,
    KeyMode,
    ScalarField,
    primary_keys,
)
from deepfeat.finetune.errors import DataError, MismatchError


def is_missing(value: Any) -> bool:
    """Whether ``value`` is a missing value of any kind: ``None``, ``pd.NA``, ``pd.NaT`` or a float NaN."""
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float | np.floating) and math.isnan(value)


def check_vectors(vectors: np.ndarray, dim: int, ids: Sequence[Any], *, where: str) -> np.ndarray:
    """Float32 (n, dim) vectors with only finite values, or a clear error.

    Milvus Lite accepts NaN and infinite vectors silently (and an IVF index build then fails), so they
    are refused before anything is written.
    """
    arr = np.asarray(vectors)
    if arr.ndim != 2 or arr.shape[0] != len(ids):
        raise DataError(f"{where}: expected vectors of shape ({len(ids)}, {dim}), got {arr.shape}")
    if arr.shape[1] != dim:
        raise MismatchError(
            f"{where}: vectors have dim {arr.shape[1]} but the collection holds dim {dim}; these "
            f"embeddings come from another model. Use the bundle that filled the collection, or a "
            f"new collection"
        )
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = [str(ids[i]) for i in np.flatnonzero(~finite)[:5]]
        raise DataError(
            f"{where}: {int((~finite).sum())} vector(s) contain NaN or infinite values (record ids "
            f"{bad}); nothing of this batch was written. Re-embed these records: a non-finite "
            f"embedding means damaged weights or a corrupt input"
        )
    return arr


def _column(table: pa.Table | pa.RecordBatch | pd.DataFrame, name: str, n: int) -> list[Any] | None:
    if isinstance(table, pd.DataFrame):
        if name not in table.columns:
            return None
        series = table[name]
        values = series.tolist()
        # numpy bool/int columns cannot hold a missing value; every other kind can (NaN, None, pd.NA)
        if not (isinstance(series.dtype, np.dtype) and series.dtype.kind in "biu"):
            values = [None if is_missing(v) else v for v in values]
        return values
    if name not in table.column_names:
        return None
    return table.column(name).to_pylist()


def _varchar(values: list[Any], name: str, limit: int, ids: list[Any]) -> list[str]:
    out = ["" if v is None else (v if isinstance(v, str) else str(v)) for v in values]
    quarter = limit // 4
    for i, s in enumerate(out):
        if len(s) > quarter and len(s.encode("utf-8")) > limit:
            raise DataError(
                f"record {ids[i]!r}: field {name!r} is {len(s.encode('utf-8'))} bytes, more than the "
                f"{limit} the collection allows; shorten it, or leave the column out"
            )
    return out


def encode_rows(
    table: pa.Table | pa.RecordBatch | pd.DataFrame,
    vectors: np.ndarray,
    *,
    collection: str,
    dim: int,
    fields: Sequence[ScalarField],
    key: KeyMode,
    fingerprint: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """Rows ready for ``upsert`` into ``collection``: key, vector, and each of ``fields`` in its type.

    The key is :func:`~deepfeat.connectors.fields.primary_keys` of the record ids (or of the content hashes
    when ``key`` is ``content_hash``); ``model_version`` is the ``bundle_id`` of ``fingerprint``; a field
    the table lacks is ``""``, ``0``/``False`` or null (for a nullable field).

    Raises:
        DataError: no ``id`` column, a non-finite vector (named by record id), a missing content hash,
            a too-long string or a value that does not convert.
        MismatchError: vectors of another dim.
    """
    n = len(table)
    ids = _column(table, "id", n)
    if ids is None:
        ids = _column(table, RECORD_ID_FIELD, n)
    if ids is None:
        raise DataError("records have no 'id' column; every record needs a stable id (see docs/contracts.md)")
    ids = [str(i) for i in ids]
    vecs = check_vectors(vectors, dim, ids, where=f"collection {collection!r}")
    if key == "content_hash":
        hashes = _column(table, "content_hash", n)
        if hashes is None or any(not h for h in hashes):
            raise DataError(
                f"collection {collection!r} is keyed by content hash, but some records have none; "
                f"embed them with 'deepfeat embed' (which adds content_hash) or key by record id"
            )
        keys = primary_keys(hashes)
    else:
        keys = primary_keys(ids)
    columns: dict[str, list[Any]] = {PK_FIELD: keys}
    version = str(fingerprint.get("bundle_id", ""))
    for f in fields:
        if f.name == RECORD_ID_FIELD:
            columns[f.name] = _varchar(ids, f.name, f.max_length or 0, ids)
            continue
        if f.name == MODEL_VERSION_FIELD:
            columns[f.name] = [version] * n
            continue
        raw = _column(table, f.name, n)
        if raw is None:
            raw = [None] * n
        columns[f.name] = _convert(raw, f, ids)
    names = list(columns)
    rows = [dict(zip(names, vals, strict=True)) for vals in zip(*columns.values(), strict=True)]
    for row, vec in zip(rows, vecs, strict=True):
        row[VECTOR_FIELD] = vec
    return rows


def _convert(raw: list[Any], f: ScalarField, ids: list[Any]) -> list[Any]:
    if f.dtype == "VARCHAR":
        return _varchar(raw, f.name, f.max_length or USER_VARCHAR_LENGTH, ids)
    default = None if f.nullable else (False if f.dtype == "BOOL" else 0)
    try:
        if f.dtype == "BOOL":
            return [default if is_missing(v) else bool(v) for v in raw]
        if f.dtype == "INT64":
            return [default if is_missing(v) else int(v) for v in raw]
        return [default if is_missing(v) else float(v) for v in raw]
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"field {f.name!r} is {f.dtype} in the collection, but a value does not convert ({exc}); "
            f"fix the column's values, or leave the column out"
        ) from exc
