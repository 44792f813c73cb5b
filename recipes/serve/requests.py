"""What the search page may ask for: search parameters and metadata filters, validated here.

Filters are ``(field, op, value)`` triples checked against the collection's schema and quoted here,
never raw user text; :func:`build_filter` turns them into a Milvus expression.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

from deepfeat.connectors.search import quote_string
from deepfeat.finetune.errors import DataError

if TYPE_CHECKING:
    from deepfeat.connectors.schema import CollectionSpec

#: Largest top-k the page asks for.
MAX_TOP_K = 100
MAX_GROUP_SIZE = 10
MAX_FILTERS = 16
MAX_FILTER_VALUE = 1024

Op = Literal["==", "!=", "<", "<=", ">", ">="]
OPS: tuple[str, ...] = get_args(Op)
ORDERING_OPS = frozenset({"<", "<=", ">", ">="})
#: Field types Milvus groups search results by.
GROUPABLE = frozenset({"VARCHAR", "INT64", "BOOL"})


class NotFoundError(DataError):
    """A record, a key or an image file the request names is not there (HTTP 404)."""


class PayloadTooLargeError(DataError):
    """An upload above the byte limit (HTTP 413)."""


@dataclass(frozen=True)
class Condition:
    """One metadata filter: ``field op value``, ANDed with the others."""

    field: str
    op: Op
    value: str | int | float | bool


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


def _literal(spec: CollectionSpec, cond: Condition) -> str:
    dtype = next(f.dtype for f in spec.fields if f.name == cond.field)
    value = cond.value
    if dtype == "VARCHAR":
        text = value if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
        if len(text) > MAX_FILTER_VALUE:
            raise DataError(f"filter value for {cond.field!r} is {len(text)} characters; at most {MAX_FILTER_VALUE}")
        return quote_string(text)
    if dtype == "BOOL":
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower()
        raise DataError(f"field {cond.field!r} is true/false; got {value!r}")
    if isinstance(value, bool):
        raise DataError(f"field {cond.field!r} is a number ({dtype}); got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise DataError(f"field {cond.field!r} is a number ({dtype}); got {value!r}") from None
    if not math.isfinite(number):
        raise DataError(f"filter value for {cond.field!r} must be finite, got {value!r}")
    if dtype == "INT64":
        if not number.is_integer():
            raise DataError(f"field {cond.field!r} holds whole numbers (INT64); got {value!r}")
        return str(int(number))
    return repr(number)


def build_filter(spec: CollectionSpec, conditions: Sequence[Condition]) -> str | None:
    """A Milvus boolean expression ANDing ``conditions``, or ``None`` for none.

    Field names must be fields of ``spec`` (so no user text reaches the expression unchecked);
    values are converted to the field's type and strings quoted by :func:`quote_string`.

    Raises:
        DataError: an unknown field, an ordering operator on a text/boolean field, or a value that is
            not of the field's type.
    """
    names = spec.field_names
    parts = []
    for cond in conditions:
        if cond.field not in names:
            raise DataError(f"cannot filter on {cond.field!r}: collection {spec.name!r} has fields {names}")
        dtype = next(f.dtype for f in spec.fields if f.name == cond.field)
        if cond.op in ORDERING_OPS and dtype not in ("INT64", "DOUBLE"):
            raise DataError(f"operator {cond.op} needs a numeric field; {cond.field!r} is {dtype} (use == or !=)")
        parts.append(f"{cond.field} {cond.op} {_literal(spec, cond)}")
    return " and ".join(parts) if parts else None


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
