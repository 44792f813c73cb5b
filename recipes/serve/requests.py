"""What the search page may ask for: search parameters and metadata filters, validated here.

Filters are ``(field, op, value)`` :class:`~deepfeat.connectors.query.Condition` triples, never raw user
text; the query layer's :func:`~deepfeat.connectors.query.build_filter` checks them against the
collection's schema and turns them into a Milvus expression with typed literals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from deepfeat.connectors.query import OPS, Condition, Op
from deepfeat.connectors.schema import CollectionSpec
from deepfeat.finetune.errors import DataError

#: Largest top-k the page asks for.
MAX_TOP_K = 100
MAX_GROUP_SIZE = 10
MAX_FILTERS = 16
MAX_FILTER_VALUE = 1024

#: Field types Milvus groups search results by.
GROUPABLE = frozenset({"VARCHAR", "INT64", "BOOL"})


class NotFoundError(DataError):
    """A record, a key or an image file the request names is not there (HTTP 404)."""


class PayloadTooLargeError(DataError):
    """An upload above the byte limit (HTTP 413)."""


@dataclass(frozen=True)
class SearchRequest:
    """What the page asks for, validated (see :func:`parse_search_request`)."""

    top_k: int = 12
    group_by: str | None = None
    group_size: int = 1
    filters: tuple[Condition, ...] = ()
    record_id: str | None = None
    include_self: bool = False


def _int_param(data: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = data.get(key, default)
    if value is None or value == "":
        return default
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise DataError(f"{key} must be a whole number from {low} to {high}, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise DataError(f"{key} must be a whole number from {low} to {high}, got {value!r}") from None
    if not low <= number <= high:
        raise DataError(f"{key} must be from {low} to {high}, got {number}")
    return number


def _parse_filters(raw_filters: Any) -> tuple[Condition, ...]:
    if not isinstance(raw_filters, list):
        raise DataError(f"filters must be a list of {{field, op, value}} objects, got {type(raw_filters).__name__}")
    if len(raw_filters) > MAX_FILTERS:
        raise DataError(f"at most {MAX_FILTERS} filters, got {len(raw_filters)}")
    filters = []
    for item in raw_filters:
        if not isinstance(item, Mapping) or set(item) != {"field", "op", "value"}:
            raise DataError(f"each filter is an object with exactly field, op and value; got {item!r}")
        field, op, value = item["field"], item["op"], item["value"]
        if not isinstance(field, str):
            raise DataError(f"a filter field must be a name, got {field!r}")
        if op not in OPS:
            raise DataError(f"filter operator {op!r} is not one of {list(OPS)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise DataError(f"filter value for {field!r} must be finite, got {value!r}")
        if not isinstance(value, str | int | float | bool):
            raise DataError(f"filter value for {field!r} must be a string, number or boolean, got {value!r}")
        if isinstance(value, str) and len(value) > MAX_FILTER_VALUE:
            raise DataError(f"filter value for {field!r} is {len(value)} characters; at most {MAX_FILTER_VALUE}")
        filters.append(Condition(field, cast(Op, op), value))
    return tuple(filters)


def parse_search_request(data: Mapping[str, Any]) -> SearchRequest:
    """A :class:`SearchRequest` from the JSON the page sends.

    Keys: ``top_k`` (1..100), ``group_by`` (a field or empty), ``group_size`` (1..10), ``filters``
    (a list of ``{"field", "op", "value"}``), ``id`` (query by a record already in the collection)
    and ``include_self`` (keep that record in its own hits).

    Raises:
        DataError: an unknown key or a value of the wrong kind (named, with what was received).
    """
    if not isinstance(data, Mapping):
        raise DataError(f"search parameters must be a JSON object, got {type(data).__name__}")
    known = {"top_k", "group_by", "group_size", "filters", "id", "include_self"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise DataError(f"unknown search parameter(s) {unknown}; known: {sorted(known)}")
    group_by = data.get("group_by") or None
    if group_by is not None and not isinstance(group_by, str):
        raise DataError(f"group_by must be a field name, got {group_by!r}")
    filters = _parse_filters(data.get("filters") or [])
    record_id = data.get("id")
    if record_id is not None and (not isinstance(record_id, str) or not record_id):
        raise DataError(f"id must be a non-empty record id (string), got {record_id!r}")
    include_self = data.get("include_self", False)
    if not isinstance(include_self, bool):
        raise DataError(f"include_self must be true or false, got {include_self!r}")
    return SearchRequest(
        top_k=_int_param(data, "top_k", 12, 1, MAX_TOP_K),
        group_by=group_by,
        group_size=_int_param(data, "group_size", 1, 1, MAX_GROUP_SIZE),
        filters=filters,
        record_id=record_id,
        include_self=include_self,
    )


def check_group_by(spec: CollectionSpec, field: str | None) -> None:
    """Refuse grouping by a field the collection lacks or Milvus cannot group by.

    Raises:
        DataError: an unknown field, or one that is not text, integer or boolean.
    """
    if field is None:
        return
    kinds = {f.name: f.dtype for f in spec.fields}
    if field not in kinds:
        raise DataError(f"cannot group by {field!r}: collection {spec.name!r} has fields {spec.field_names}")
    if kinds[field] not in GROUPABLE:
        raise DataError(f"cannot group by {field!r}: it is {kinds[field]}; Milvus groups by text, integer or boolean")
