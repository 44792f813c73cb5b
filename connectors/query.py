"""The one Milvus query layer: filters with typed literals, row fetching, per-query search, iteration.

Every filter expression deepfeat sends is built here (:func:`build_filter`), from field conditions whose
values become literals of the field's type (:func:`milvus_literal`): strings double-quoted with Milvus'
own escapes (:func:`quote_string`), numbers and booleans checked, so an id or a label with quotes,
backslashes or newlines is a value, never expression text. The recipes, the search page and the CLI read
rows (:func:`fetch_rows`, :func:`query_rows`), search (:func:`search_vectors`, :func:`search_ids`,
:func:`search_each`) and walk collections (:func:`iter_collection`, :func:`collection_frame`) through it.

Filter templates (``filter="label == {l}", filter_params={"l": ...}``, pymilvus 3.0.2) were measured
against Milvus Lite 3.2.2, the embedded default, on 2026-12-07: its expression parser refuses the
placeholder (``unexpected character '{'``) in every operation that takes a filter: ``query``,
``search`` (plain, ``group_by_field``, range), ``delete``, ``query_iterator`` and ``search_iterator``,
for ``==``, ``!=``, ``in``, ``<=``/``>=`` on VARCHAR, INT64, DOUBLE and BOOL fields alike
(``tests/connectors/test_query.py`` checks that this is still so). Milvus documents templates for servers from its
2.5 docs on ("Filter Templating"); the server deepfeat's tests can start (the PyPI ``milvus`` package,
2.3.5) is older, and no other Milvus Lite generation installs offline here, so neither was measured.
deepfeat therefore sends literals everywhere; the same run showed that the literals of
:func:`quote_string` round-trip every hard string tried (``a"b``, ``c'd``, ``e\\f``, ``x\\ny``, a tab,
``"``, ``''``, ``{v}``, ``Müller``, ``日本``), alone and in ``in [...]`` lists.

Keys with quotes are the known Milvus Lite trap: ``get(ids=[...])`` fails on keys holding ``'``, ``\\``
or a newline (measured: ``unterminated string literal``), so rows are looked up here by a quoted
``in [...]`` filter, never by ``get``; deepfeat's own keys are hex digests in any case.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd

from deepfeat.connectors.client import MilvusConnector
from deepfeat.connectors.collection import BundleLike, open_collection
from deepfeat.connectors.fields import RECORD_ID_FIELD, ScalarType, primary_keys
from deepfeat.connectors.rows import check_vectors
from deepfeat.connectors.schema import CollectionSpec
from deepfeat.finetune.errors import DataError

log = logging.getLogger(__name__)

Hit = dict[str, Any]
Op = Literal["==", "!=", "<", "<=", ">", ">="]
OPS: tuple[str, ...] = get_args(Op)
ORDERING_OPS = frozenset({"<", "<=", ">", ">="})
#: Fields a hit carries unless ``output_fields`` says otherwise.
DEFAULT_OUTPUT_FIELDS = (RECORD_ID_FIELD, "label", "group", "split", "path")
#: Over-fetch factor when a server without native group-by (Milvus < 2.4) is grouped on the client.
CLIENT_GROUP_FETCH = 10
#: Milvus' largest top-k (and largest ``offset + limit`` of one query).
MAX_LIMIT = 16384
#: Values in one ``in [...]`` filter.
IN_CHUNK = 500


@dataclass(frozen=True)
class Condition:
    """One field condition ``field op value``, ANDed with the others by :func:`build_filter`."""

    field: str
    op: Op
    value: str | int | float | bool


# --------------------------------------------------------------------------------------------------
# literals and filters


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


def _bool_literal(value: Any, field: str) -> str:
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower()
    raise DataError(f"field {field!r} is true/false; got {value!r}")


def _number(value: Any, field: str, dtype: str) -> float:
    if isinstance(value, bool | np.bool_):
        raise DataError(f"field {field!r} is a number ({dtype}); got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"field {field!r} is a number ({dtype}); got {value!r}") from None
    if not math.isfinite(number):
        raise DataError(f"cannot filter {field!r} on the non-finite value {value!r}; give a finite number")
    return number


def milvus_literal(value: Any, dtype: ScalarType | None = None, *, field: str = "value") -> str:
    """``value`` as a Milvus expression literal of ``dtype`` (or of its own Python type when ``None``).

    ``VARCHAR`` quotes the text (a number or boolean given for a text field is compared as its text,
    ``true``/``false`` for booleans); ``INT64`` needs a whole number; ``DOUBLE`` any finite number;
    ``BOOL`` a boolean or the text ``true``/``false``.

    Raises:
        DataError: a value not of the field's type, a non-finite number, or a string with a control
            character Milvus cannot express.
    """
    if dtype is None:
        if isinstance(value, bool | np.bool_):
            dtype = "BOOL"
        elif isinstance(value, int | np.integer):
            dtype = "INT64"
        elif isinstance(value, float | np.floating):
            dtype = "DOUBLE"
        else:
            dtype = "VARCHAR"
    if dtype == "VARCHAR":
        text = str(value).lower() if isinstance(value, bool | np.bool_) else str(value)
        return quote_string(text)
    if dtype == "BOOL":
        return _bool_literal(value, field)
    number = _number(value, field, dtype)
    if dtype == "INT64":
        if not number.is_integer():
            raise DataError(f"field {field!r} holds whole numbers (INT64); got {value!r}")
        return str(int(value)) if isinstance(value, int | np.integer) else str(int(number))
    return repr(number)


def build_filter(
    *clauses: str | None,
    equals: Mapping[str, Any] | None = None,
    not_equals: Mapping[str, Any] | None = None,
    ranges: Mapping[str, tuple[float | None, float | None]] | None = None,
    isin: Mapping[str, Sequence[Any]] | None = None,
    conditions: Sequence[Condition] = (),
    spec: CollectionSpec | None = None,
) -> str | None:
    """A Milvus boolean expression: free ``clauses`` (kept as given, parenthesised) and field conditions,
    joined with ``and``; ``None`` when there is nothing to filter on.

    Args:
        equals / not_equals: ``field == value`` / ``field != value``.
        ranges: ``field -> (low, high)``, inclusive; ``None`` leaves that side open.
        isin: ``field in [values]`` (an empty list matches nothing).
        conditions: :class:`Condition` triples (the search page's filters).
        spec: the collection: when given, every field must be one of its fields (so no unchecked name
            reaches the expression), values become literals of the field's type, and ordering
            operators are refused on text and boolean fields. Without it, values are typed by their
            Python type.

    Raises:
        DataError: an unknown field, an ordering operator on a non-numeric field, or a value that is
            not of the field's type.
    """
    triples: list[tuple[str, str, Any]] = [(c.field, c.op, c.value) for c in conditions]
    triples += [(name, "==", v) for name, v in (equals or {}).items()]
    triples += [(name, "!=", v) for name, v in (not_equals or {}).items()]
    for name, (low, high) in (ranges or {}).items():
        triples += [(name, ">=", float(low))] if low is not None else []
        triples += [(name, "<=", float(high))] if high is not None else []
    parts = [f"({c})" for c in clauses if c]
    if spec is not None:
        known = [spec.pk_field, *spec.field_names]
        unknown = [name for name, _, _ in triples if name not in known] + [n for n in isin or {} if n not in known]
        if unknown:
            raise DataError(f"cannot filter on {unknown[0]!r}: collection {spec.name!r} has fields {spec.field_names}")
    for name, op, value in triples:
        if op not in OPS:
            raise DataError(f"filter operator {op!r} is not one of {list(OPS)}")
        dtype = spec.field_type(name) if spec is not None else None
        if spec is not None and op in ORDERING_OPS and dtype not in ("INT64", "DOUBLE"):
            raise DataError(f"operator {op} needs a numeric field; {name!r} is {dtype} (use == or !=)")
        parts.append(f"{name} {op} {milvus_literal(value, dtype, field=name)}")
    for name, values in (isin or {}).items():
        dtype = spec.field_type(name) if spec is not None else None
        parts.append(f"{name} in [{', '.join(milvus_literal(v, dtype, field=name) for v in values)}]")
    return " and ".join(parts) or None


# --------------------------------------------------------------------------------------------------
# rows


def query_rows(
    conn: MilvusConnector,
    spec: CollectionSpec,
    fields: Sequence[str],
    *,
    filter: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Rows of ``spec``'s collection matching ``filter`` (its key plus ``fields``), at most ``limit``.

    Raises:
        DataError: ``offset + limit`` above Milvus' window of 16384 rows (use :func:`iter_collection`).
    """
    if limit is not None and offset + limit > MAX_LIMIT:
        raise DataError(
            f"offset + limit is {offset + limit}, above Milvus' {MAX_LIMIT}; iterate the collection instead"
        )
    window: dict[str, Any] = {"limit": limit, "offset": offset} if limit is not None else {}
    conn.ensure_loaded(spec.name)
    rows = conn.call(
        "query",
        conn.client.query,
        spec.name,
        filter=filter or "",
        output_fields=list(dict.fromkeys([spec.pk_field, *fields])),
        **window,
    )
    return [dict(r) for r in rows]


def _lookup(spec: CollectionSpec, ids: Sequence[str]) -> tuple[str, list[Any]]:
    """The field record ids are found by, and the values to look for (hex keys where that is the key)."""
    if not spec.managed:  # a foreign collection: ids are its primary key values
        return spec.pk_field, list(ids)
    if spec.key == "record_id":
        return spec.pk_field, primary_keys(ids)
    return RECORD_ID_FIELD, list(ids)


def fetch_rows(
    conn: MilvusConnector, collection: str, record_ids: Sequence[Any], fields: Sequence[str] = ("group", "label")
) -> dict[str, dict[str, Any]]:
    """Stored rows by record id: ``{id: row}`` with the key, the vector and ``fields``.

    Record ids are the records' ``id`` column in deepfeat's collections, the primary key values in a
    collection deepfeat did not create.

    Raises:
        DataError: an unknown field, or ids not in the collection (the first five named).
    """
    spec = open_collection(conn, collection, foreign_ok=True)
    unknown = [f for f in fields if f not in spec.field_names]
    if unknown:
        raise DataError(f"field(s) {unknown} are not in collection {collection!r}; it has {spec.field_names}")
    ids = [str(i) for i in record_ids]
    by, values = _lookup(spec, ids)
    wanted = [spec.vector_field, *fields, *([RECORD_ID_FIELD] if spec.managed else [])]
    found: dict[str, dict[str, Any]] = {}
    for start in range(0, len(values), IN_CHUNK):
        expr = build_filter(isin={by: values[start : start + IN_CHUNK]}, spec=spec)
        for row in query_rows(conn, spec, wanted, filter=expr):
            found[str(row[RECORD_ID_FIELD] if spec.managed else row[spec.pk_field])] = row
    missing = [i for i in ids if i not in found]
    if missing:
        what = "the 'id' column of the records (for folders, the relative paths)" if spec.managed else "primary keys"
        raise DataError(
            f"record id(s) {missing[:5]} are not in collection {spec.name!r} ({len(missing)} missing); "
            f"the ids are {what}"
        )
    return found


def fetch_vectors(conn: MilvusConnector, collection: str, record_ids: Sequence[Any]) -> np.ndarray:
    """Stored vectors of records (in the order given), float32 (n, dim).

    Raises:
        DataError: some ids are not in the collection (named).
    """
    spec = open_collection(conn, collection, foreign_ok=True)
    rows = fetch_rows(conn, collection, record_ids, ())
    return np.asarray([rows[str(i)][spec.vector_field] for i in record_ids], dtype=np.float32).reshape(
        len(record_ids), spec.dim
    )


def iter_collection(
    conn: MilvusConnector, collection: str, fields: Sequence[str], *, filter: str | None = None
) -> Iterator[dict[str, Any]]:
    """Every row of a collection (its key plus ``fields``; the vector field may be named), by a query
    iterator (no 16384-row window).

    Raises:
        DataError: a field the collection does not have.
    """
    spec = open_collection(conn, collection, foreign_ok=True)
    unknown = [f for f in fields if f not in (*spec.field_names, spec.vector_field, spec.pk_field)]
    if unknown:
        raise DataError(f"field(s) {unknown} are not in collection {collection!r}; it has {spec.field_names}")
    yield from conn.iter_rows(spec.name, list(dict.fromkeys([spec.pk_field, *fields])), filter=filter or "")


def collection_frame(
    conn: MilvusConnector,
    collection: str,
    fields: Sequence[str] = (RECORD_ID_FIELD, "label", "path"),
    *,
    filter: str | None = None,
) -> tuple[pd.DataFrame, np.ndarray]:
    """All rows of a collection as (metadata table, float32 vectors (n, dim)), in key order.

    Raises:
        DataError: the collection (or the filter) holds no rows.
    """
    spec = open_collection(conn, collection, foreign_ok=True)
    rows = sorted(
        iter_collection(conn, collection, [*fields, spec.vector_field], filter=filter),
        key=lambda r: str(r[spec.pk_field]),
    )
    if not rows:
        where = f" matching {filter!r}" if filter else ""
        raise DataError(f"collection {collection!r} holds no rows{where}; load embeddings first ('deepfeat load')")
    vectors = np.asarray([r[spec.vector_field] for r in rows], dtype=np.float32)
    meta = pd.DataFrame([{k: v for k, v in r.items() if k != spec.vector_field} for r in rows])
    return meta, vectors


# --------------------------------------------------------------------------------------------------
# searches


def _output_fields(spec: CollectionSpec, fields: Sequence[str] | None, extra: Sequence[str] = ()) -> list[str]:
    available = [*spec.field_names, spec.vector_field]
    if fields is None:
        wanted = [f for f in DEFAULT_OUTPUT_FIELDS if f in available]
    elif list(fields) == ["*"]:
        wanted = list(spec.field_names)
    else:
        wanted = list(fields)
    unknown = [f for f in wanted if f not in available]
    if unknown and not spec.dynamic:  # a dynamic field is known only to the rows that carry it
        raise DataError(f"output field(s) {unknown} are not in collection {spec.name!r}; it has {spec.field_names}")
    return [*wanted, *(f for f in extra if f not in wanted)]


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


def _to_hits(raw: Any, spec: CollectionSpec, fields: Sequence[str]) -> list[list[Hit]]:
    out: list[list[Hit]] = []
    for hits in raw:
        rows: list[Hit] = []
        for rank, hit in enumerate(hits, start=1):
            entity = hit.get("entity") or {}
            row: Hit = {"rank": rank, "pk": hit.get(spec.pk_field, hit.get("id")), "score": float(hit["distance"])}
            for f in fields:
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

    Works on a collection deepfeat did not create too (a plain ``MilvusClient`` one: its own vector
    field, key and metric), as long as the vectors have its dim.

    Args:
        collection: a collection or an alias.
        top_k: hits per query (groups per query with ``group_by``).
        filter: a Milvus boolean expression on scalar fields (build it with :func:`build_filter`).
        group_by: a scalar field (``group`` for one hit per product/patient); ``group_size`` hits per group.
        radius: range search: for COSINE/IP keep hits with similarity above ``radius`` (and up to
            ``range_filter``); for L2 keep distances below ``radius`` (and from ``range_filter``).
        output_fields: fields in each hit (default: record_id, label, group, split, path where the
            collection has them; ``["*"]`` for all scalar fields; add the vector field for the stored vectors).
        search_params: index search parameters (``{"ef": 128}``, ``{"nprobe": 32}``).
        batch_size: queries per request.
        bundle: when given, it must be the bundle that filled the collection.

    Raises:
        MismatchError: ``bundle`` or the vectors' dim disagree with the collection.
        DataError: NaN/Inf query vectors, unknown fields, inconsistent range bounds.
    """
    if not 1 <= top_k <= MAX_LIMIT:
        raise DataError(f"top_k must be between 1 and {MAX_LIMIT}, got {top_k}")
    spec = open_collection(conn, collection, bundle=bundle, what="searching", foreign_ok=True)
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
    kwargs: dict[str, Any] = {
        "limit": limit,
        "output_fields": request_fields,
        "search_params": _search_params(spec, limit, radius, range_filter, search_params),
        "anns_field": spec.vector_field,
    }
    if filter:
        kwargs["filter"] = filter
    if native_group:
        kwargs["group_by_field"] = group_by
        if group_size > 1:
            kwargs.update(group_size=group_size, strict_group_size=False)
    conn.ensure_loaded(spec.name)
    results: list[list[Hit]] = []
    for start in range(0, len(queries), batch_size):
        chunk = list(queries[start : start + batch_size])
        raw = conn.call("search", conn.client.search, spec.name, data=chunk, **kwargs)
        results.extend(_to_hits(raw, spec, request_fields))
    if client_group and group_by is not None:
        results = _group_on_client(results, group_by, top_k, group_size)
    if group_by is not None and group_by not in fields:
        for hits in results:
            for h in hits:
                h.pop(group_by, None)
    return results


def search_ids(
    conn: MilvusConnector,
    collection: str,
    record_ids: Sequence[Any],
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
    if not exclude_self:
        return search_vectors(conn, collection, fetch_vectors(conn, collection, record_ids), top_k=top_k, **kwargs)
    return search_each(
        conn, collection, record_ids, top_k=top_k, exclude_own_group=False, group_by=kwargs.pop("group_by", None),
        **kwargs,
    )


def search_each(
    conn: MilvusConnector,
    collection: str,
    record_ids: Sequence[Any],
    *,
    top_k: int = 5,
    filter: str | None = None,
    same: Sequence[str] = (),
    exclude_own_group: bool = False,
    group_by: str | None = "group",
    output_fields: Sequence[str] | None = None,
    **kwargs: Any,
) -> list[list[Hit]]:
    """One search per stored record, by its own vector, never returning the record itself.

    Args:
        filter: a Milvus expression every hit must satisfy.
        same: fields whose value a hit must share with its query (e.g. ``("modality", "body_part")``);
            a query without a value (``""``) is not restricted on that field.
        exclude_own_group: leave out every record of the query's own ``group`` (its patient, its product).
        group_by: one hit per value of this field (``None``: plain top-k).
        output_fields: fields in each hit (as in :func:`search_vectors`; by default also ``same``).
        kwargs: the other options of :func:`search_vectors` (``search_params``, ``radius``, ...).
    """
    spec = open_collection(conn, collection, foreign_ok=True)
    needed = list(dict.fromkeys([*(["group"] if exclude_own_group else []), *same]))
    rows = fetch_rows(conn, collection, record_ids, needed)
    if output_fields is None and same:
        output_fields = [*_output_fields(spec, None), *(f for f in same if f not in DEFAULT_OUTPUT_FIELDS)]
    out: list[list[Hit]] = []
    for rid in record_ids:
        row = rows[str(rid)]
        expr = build_filter(
            filter,
            not_equals={spec.pk_field: row[spec.pk_field], **({"group": row["group"]} if exclude_own_group else {})},
            equals={f: row[f] for f in same if row.get(f) not in (None, "")},
            spec=spec,
        )
        vector = np.asarray(row[spec.vector_field], dtype=np.float32)[None, :]
        out.extend(
            search_vectors(
                conn,
                collection,
                vector,
                top_k=top_k,
                filter=expr,
                group_by=group_by,
                output_fields=output_fields,
                **kwargs,
            )
        )
    return out


__all__ = [
    "DEFAULT_OUTPUT_FIELDS",
    "OPS",
    "Condition",
    "Hit",
    "Op",
    "build_filter",
    "collection_frame",
    "fetch_rows",
    "fetch_vectors",
    "iter_collection",
    "milvus_literal",
    "query_rows",
    "quote_string",
    "search_each",
    "search_ids",
    "search_vectors",
]
