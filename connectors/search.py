"""Search a deepfeat collection by image, by record id, or by vector; results as plain data or a table.

Every search supports top-k with metadata filters (Milvus boolean expressions such as
``label == "shoe" and split != "train"``), group-by (one hit per product or patient), range search
(a similarity threshold), batched queries and chosen output fields. A search with images is refused
when the bundle is not the one that filled the collection: vectors of two models are not comparable.

Results are ``list[list[dict]]``: one list per query, one dict per hit with ``rank``, ``pk``,
``score`` (the metric's value: cosine or inner-product similarity, higher is closer; or L2 distance,
lower is closer) and the output fields.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepfeat.connectors.client import MilvusConnector
from deepfeat.connectors.collection import BundleLike, open_collection
from deepfeat.connectors.schema import (
    PK_FIELD,
    RECORD_ID_FIELD,
    VECTOR_FIELD,
    CollectionSpec,
    check_vectors,
    primary_keys,
)
from deepfeat.finetune.errors import DataError
from deepfeat.finetune.models.bundle import ModelBundle

log = logging.getLogger(__name__)

Hit = dict[str, Any]
#: Fields a hit carries unless ``output_fields`` says otherwise.
DEFAULT_OUTPUT_FIELDS = (RECORD_ID_FIELD, "label", "group", "split", "path")
#: Over-fetch factor when a server without native group-by (Milvus < 2.4) is grouped on the client.
CLIENT_GROUP_FETCH = 10
#: Milvus' largest top-k.
MAX_LIMIT = 16384


def _output_fields(spec: CollectionSpec, fields: Sequence[str] | None, extra: Sequence[str] = ()) -> list[str]:
    available = [*spec.field_names, VECTOR_FIELD]
    if fields is None:
        wanted = [f for f in DEFAULT_OUTPUT_FIELDS if f in available]
    elif list(fields) == ["*"]:
        wanted = list(spec.field_names)
    else:
        wanted = list(fields)
    unknown = [f for f in wanted if f not in available]
    if unknown:
        raise DataError(f"output field(s) {unknown} are not in collection {spec.name!r}; it has {spec.field_names}")
    for f in extra:
        if f not in wanted:
            wanted.append(f)
    return wanted


def _search_params(
    spec: CollectionSpec,
    top_k: int,
    radius: float | None,
    range_filter: float | None,
    search_params: Mapping[str, Any] | None,
) -> dict[str, Any]:
    params = {**spec.index.search_defaults(top_k), **dict(search_params or {})}
    if range_filter is not None and radius is None:
        raise DataError(
            "range_filter needs radius: radius is the outer bound of a range search, range_filter the inner one"
        )
    if radius is not None:
        params["radius"] = float(radius)
        if range_filter is not None:
            params["range_filter"] = float(range_filter)
            closer_first = spec.metric == "L2"
            if (closer_first and range_filter >= radius) or (not closer_first and range_filter <= radius):
                raise DataError(
                    f"for metric {spec.metric}, range_filter ({range_filter}) must be "
                    f"{'below' if closer_first else 'above'} radius ({radius})"
                )
    return {"metric_type": spec.metric, "params": params}


def _to_hits(raw: Any, fields: Sequence[str], keep: Sequence[str]) -> list[list[Hit]]:
    out: list[list[Hit]] = []
    for hits in raw:
        rows: list[Hit] = []
        for rank, hit in enumerate(hits, start=1):
            entity = hit.get("entity") or {}
            pk = hit.get(PK_FIELD, hit.get("id"))
            row: Hit = {"rank": rank, "pk": pk, "score": float(hit["distance"])}
            for f in fields:
                if f in keep:
                    value = entity.get(f)
                    row[f] = value.tolist() if isinstance(value, np.ndarray) else value
            rows.append(row)
        out.append(rows)
    return out


def _group_on_client(results: list[list[Hit]], field: str, top_k: int, group_size: int) -> list[list[Hit]]:
    grouped = []
    for hits in results:
        seen: dict[Any, int] = {}
        kept = []
        for h in hits:
            value = h.get(field)
            if seen.get(value, 0) < group_size:
                seen[value] = seen.get(value, 0) + 1
                kept.append(h)
            if len(seen) >= top_k and all(n >= group_size for n in seen.values()):
                break
        kept = [h for h in kept if h.get(field) in list(seen)[:top_k]]
        for rank, h in enumerate(kept, start=1):
            h["rank"] = rank
        grouped.append(kept)
    return grouped


def search_vectors(
    conn: MilvusConnector,
    collection: str,
    vectors: np.ndarray | Sequence[Sequence[float]],
    *,
    top_k: int = 10,
    filter: str | None = None,
    group_by: str | None = None,
    group_size: int = 1,
    radius: float | None = None,
    range_filter: float | None = None,
    output_fields: Sequence[str] | None = None,
    search_params: Mapping[str, Any] | None = None,
    batch_size: int = 256,
    bundle: BundleLike | None = None,
) -> list[list[Hit]]:
    """Top-k search with query vectors (n, dim).

    Args:
        collection: a collection or an alias.
        top_k: hits per query (groups per query with ``group_by``).
        filter: a Milvus boolean expression on scalar fields, e.g. ``'label == "shoe" and split == "test"'``.
        group_by: a scalar field (``group`` for one hit per product/patient); ``group_size`` hits per group.
        radius: range search: for COSINE/IP keep hits with similarity above ``radius`` (and up to
            ``range_filter``); for L2 keep distances below ``radius`` (and from ``range_filter``).
        output_fields: fields in each hit (default: record_id, label, group, split, path; ``["*"]``
            for all scalar fields; add ``"vector"`` for the stored vectors).
        search_params: index search parameters (``{"ef": 128}``, ``{"nprobe": 32}``).
        batch_size: queries per request.
        bundle: when given, it must be the bundle that filled the collection.

    Raises:
        MismatchError: ``bundle`` or the vectors' dim disagree with the collection.
        DataError: NaN/Inf query vectors, unknown fields, inconsistent range bounds.
    """
    if not 1 <= top_k <= MAX_LIMIT:
        raise DataError(f"top_k must be between 1 and {MAX_LIMIT}, got {top_k}")
    spec = open_collection(conn, collection, bundle=bundle, what="searching")
    arr = np.asarray(vectors, dtype=np.float32)
    arr = arr[None, :] if arr.ndim == 1 else arr
    queries = check_vectors(arr, spec.dim, list(range(len(arr))), where="query vectors")
    fields = _output_fields(spec, output_fields)
    if group_by is not None and group_by not in spec.field_names:
        raise DataError(f"cannot group by {group_by!r}: collection {spec.name!r} has fields {spec.field_names}")
    native_group = group_by is not None and conn.version_at_least(2, 4)
    client_group = group_by is not None and not native_group
    if client_group:
        log.warning(
            "Milvus %s has no group-by; grouping on the client from %dx over-fetched hits",
            conn.server_version(),
            CLIENT_GROUP_FETCH,
        )
    request_fields = _output_fields(spec, fields, extra=[group_by] if group_by else [])
    limit = min(top_k * CLIENT_GROUP_FETCH * group_size if client_group else top_k, MAX_LIMIT)
    params = _search_params(spec, limit, radius, range_filter, search_params)
    kwargs: dict[str, Any] = {
        "limit": limit,
        "output_fields": request_fields,
        "search_params": params,
        "anns_field": VECTOR_FIELD,
    }
    if filter:
        kwargs["filter"] = filter
    if native_group:
        kwargs["group_by_field"] = group_by
        if group_size > 1:
            kwargs["group_size"] = group_size
            kwargs["strict_group_size"] = False
    conn.ensure_loaded(spec.name)
    results: list[list[Hit]] = []
    for start in range(0, len(queries), batch_size):
        chunk = [v for v in queries[start : start + batch_size]]
        raw = conn.call("search", conn.client.search, collection, data=chunk, **kwargs)
        results.extend(_to_hits(raw, request_fields, request_fields))
    if client_group and group_by is not None:
        results = _group_on_client(results, group_by, top_k, group_size)
    if group_by is not None and group_by not in fields:
        for hits in results:
            for h in hits:
                h.pop(group_by, None)
    return results


def _as_bundle(bundle: ModelBundle | str | Path) -> ModelBundle:
    return bundle if isinstance(bundle, ModelBundle) else ModelBundle.load(bundle)


def search_images(
    conn: MilvusConnector,
    collection: str,
    images: Sequence[Any],
    bundle: ModelBundle | str | Path,
    *,
    embed_batch_size: int = 64,
    **kwargs: Any,
) -> list[list[Hit]]:
    """Search with images (paths, encoded bytes or HxWxC arrays), embedded by ``bundle``.

    ``kwargs`` are those of :func:`search_vectors`.

    Raises:
        MismatchError: ``bundle`` is not the bundle that filled the collection (checked before embedding).
    """
    model = _as_bundle(bundle)
    open_collection(conn, collection, bundle=model, what="searching")
    if not len(images):
        return []
    vectors = model.embed(list(images), batch_size=embed_batch_size)
    return search_vectors(conn, collection, vectors, **kwargs)


def quote_string(value: str) -> str:
    """``value`` as a double-quoted Milvus expression string.

    Milvus' parser knows ``\\\\ \\" \\n \\r \\t`` but refuses ``\\uXXXX`` and ``\\xNN`` (so
    ``json.dumps`` is not safe for non-ASCII text); other control characters are refused.

    Raises:
        DataError: the value holds a control character Milvus cannot express.
    """
    bad = sorted({hex(ord(c)) for c in value if (ord(c) < 0x20 and c not in "\n\r\t") or ord(c) == 0x7F})
    if bad:
        raise DataError(f"filter value {value!r} holds control character(s) {bad} that a Milvus filter cannot express")
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + escaped.replace("\t", "\\t") + '"'


def _fetch(conn: MilvusConnector, collection: str, record_ids: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    spec = open_collection(conn, collection)
    conn.ensure_loaded(spec.name)
    ids = [str(i) for i in record_ids]
    fields = [PK_FIELD, VECTOR_FIELD, RECORD_ID_FIELD]
    if spec.key == "record_id":
        got = conn.call("get", conn.client.get, collection, ids=primary_keys(ids), output_fields=fields)
    else:  # keyed by content: look the ids up by the record_id field (JSON quoting escapes quotes)
        expr = f"{RECORD_ID_FIELD} in [{', '.join(quote_string(str(i)) for i in ids)}]"
        got = conn.call("query", conn.client.query, collection, filter=expr, output_fields=fields)
    by_id = {str(r[RECORD_ID_FIELD]): r for r in got}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise DataError(
            f"record id(s) {missing[:5]} are not in collection {spec.name!r} ({len(missing)} missing); "
            f"check the ids (they are the 'id' column of the records, e.g. relative paths)"
        )
    vectors = np.asarray([by_id[i][VECTOR_FIELD] for i in ids], dtype=np.float32)
    return vectors, [str(by_id[i][PK_FIELD]) for i in ids]


def fetch_vectors(conn: MilvusConnector, collection: str, record_ids: Sequence[str]) -> np.ndarray:
    """Stored vectors of records (in the order given), float32 (n, dim).

    Raises:
        DataError: some ids are not in the collection (named).
    """
    return _fetch(conn, collection, record_ids)[0]


def search_ids(
    conn: MilvusConnector,
    collection: str,
    record_ids: Sequence[str],
    *,
    top_k: int = 10,
    exclude_self: bool = True,
    **kwargs: Any,
) -> list[list[Hit]]:
    """Search with the stored vectors of records ("more like this").

    Args:
        exclude_self: leave each query record out of its own hits (by a filter on its key, so group-by
            and range search still return full results).
        kwargs: those of :func:`search_vectors`.
    """
    vectors, keys = _fetch(conn, collection, record_ids)
    if not exclude_self:
        return search_vectors(conn, collection, vectors, top_k=top_k, **kwargs)
    user_filter = kwargs.pop("filter", None)
    out: list[list[Hit]] = []
    for vector, key in zip(vectors, keys, strict=True):
        expr = f'{PK_FIELD} != "{key}"' + (f" and ({user_filter})" if user_filter else "")
        out.extend(search_vectors(conn, collection, vector[None, :], top_k=top_k, filter=expr, **kwargs))
    return out


def _cell(value: Any, width: int) -> str:
    text = f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))
    if isinstance(value, list):
        text = f"[{len(value)} values]"
    return text if len(text) <= width else text[: width - 1] + "…"


def format_hits_table(
    results: Sequence[Sequence[Hit]],
    *,
    queries: Sequence[str] | None = None,
    fields: Sequence[str] | None = None,
    max_width: int = 48,
) -> str:
    """Results as an aligned text table: query, rank, score and the fields (default: all but ``pk``)."""
    if queries is not None and len(queries) != len(results):
        raise DataError(f"{len(queries)} query labels for {len(results)} result lists")
    labels = list(queries) if queries is not None else [f"#{i}" for i in range(len(results))]
    if fields is None:
        seen: list[str] = []
        for hits in results:
            for h in hits:
                seen.extend(k for k in h if k not in ("rank", "score", "pk") and k not in seen)
        fields = seen
    header = ["query", "rank", "score", *fields]
    rows: list[list[str]] = []
    for i, hits in enumerate(results):
        if not hits:
            rows.append([labels[i], "-", "(no hits)", *[""] * len(fields)])
        for h in hits:
            rows.append(
                [
                    labels[i],
                    str(h["rank"]),
                    _cell(float(h["score"]), max_width),
                    *(_cell(h.get(f), max_width) for f in fields),
                ]
            )
    return format_table(header, rows)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, max_width: int = 48) -> str:
    """An aligned text table with a rule under the header."""
    cells = [[str(h) for h in header]] + [
        [_cell(v, max_width) if not isinstance(v, str) else v for v in r] for r in rows
    ]
    widths = [max(len(r[c]) for r in cells) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


__all__ = [
    "DEFAULT_OUTPUT_FIELDS",
    "Hit",
    "fetch_vectors",
    "format_hits_table",
    "format_table",
    "search_ids",
    "search_images",
    "search_vectors",
]
