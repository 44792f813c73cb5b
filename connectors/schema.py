"""Collection specs derived from a model bundle, and the rows that fill them.

A :class:`CollectionSpec` fixes everything a collection of deepfeat embeddings needs: a stable
``VARCHAR`` primary key (a BLAKE2b digest of the record id or of the content hash, never ``auto_id``,
so a re-run overwrites instead of duplicating, and keys never contain quotes), a ``FLOAT_VECTOR`` of the
bundle's dim and metric, scalar fields from the record metadata, and an index whose build parameters
are sent nested (``{"params": {...}}``), the only form Milvus Lite does not silently drop, and checked
after creation. The bundle fingerprint and the spec are stored as collection properties, so a
collection knows which model filled it and refuses another.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import pandas as pd
import pyarrow as pa

from deepfeat.finetune.errors import ConnectorError, DataError, MismatchError
from deepfeat.finetune.models.card import BundleCard, check_compatible, read_card

if TYPE_CHECKING:  # the bundle module imports torch; a card is all a schema needs
    from deepfeat.finetune.models.bundle import ModelBundle

log = logging.getLogger(__name__)

SPEC_FORMAT = 1
PK_FIELD = "pk"
VECTOR_FIELD = "vector"
RECORD_ID_FIELD = "record_id"
MODEL_VERSION_FIELD = "model_version"
PROP_BUNDLE = "deepfeat.bundle"
PROP_SPEC = "deepfeat.spec"
PK_LENGTH = 32  # hex digits of a 16-byte BLAKE2b digest

#: Fields every deepfeat collection has besides the key and the vector: name -> max length (UTF-8 bytes).
FIXED_FIELDS: dict[str, int] = {
    RECORD_ID_FIELD: 4096,
    "label": 1024,
    "group": 1024,
    "split": 64,
    "path": 4096,
    "content_hash": 128,
    MODEL_VERSION_FIELD: 256,
}
USER_VARCHAR_LENGTH = 2048
#: Record columns that never become user fields (they are fixed fields, the vector, or pixels).
_NOT_USER = {"id", "image", VECTOR_FIELD, PK_FIELD, *FIXED_FIELDS}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
_NON_NULL_BOOLS = {"is_query", "is_gallery"}

KeyMode = Literal["record_id", "content_hash"]
Metric = Literal["COSINE", "IP", "L2"]
IndexType = Literal["FLAT", "IVF_FLAT", "IVF_SQ8", "HNSW", "HNSW_SQ", "AUTOINDEX"]
ScalarType = Literal["VARCHAR", "INT64", "DOUBLE", "BOOL"]

_BUILD_DEFAULTS: dict[str, dict[str, Any]] = {
    "FLAT": {},
    "IVF_FLAT": {"nlist": 128},
    "IVF_SQ8": {"nlist": 128},
    "HNSW": {"M": 16, "efConstruction": 200},
    "HNSW_SQ": {"M": 16, "efConstruction": 200, "sq_type": "SQ8"},
    "AUTOINDEX": {},
}
_SEARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "FLAT": {},
    "IVF_FLAT": {"nprobe": 16},
    "IVF_SQ8": {"nprobe": 16},
    "HNSW": {"ef": 64},
    "HNSW_SQ": {"ef": 64},
    "AUTOINDEX": {},
}


_INT_MAX = 2**31 - 1


@dataclass(frozen=True)
class ParamRule:
    """What one index parameter accepts: an integer or number in ``[low, high]``, a boolean, or one
    of ``choices`` (the ranges of the Milvus index documentation, checked before a collection exists)."""

    kind: Literal["int", "float", "bool", "choice"]
    low: float = -math.inf
    high: float = math.inf
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        """The accepted values, for messages."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        what = "an integer" if self.kind == "int" else "a number"
        def show(x: float) -> str:
            return str(int(x)) if self.kind == "int" else f"{x:g}"

        low = "" if math.isinf(self.low) else f" of at least {show(self.low)}"
        high = "" if math.isinf(self.high) else f" and at most {show(self.high)}"
        return f"{what}{low}{high}"

    def coerce(self, value: Any) -> int | float | bool | str | None:
        """``value`` in its canonical type, or ``None`` when the rule refuses it."""
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            return {"true": True, "1": True, "false": False, "0": False}.get(text)
        if self.kind == "choice":
            text = str(value).strip().upper()
            return text if text in self.choices else None
        if isinstance(value, bool):
            return None
        number = _number(value.strip()) if isinstance(value, str) else value
        if not isinstance(number, int | float) or not math.isfinite(number):
            return None
        if self.kind == "int":
            if float(number) != int(number):
                return None
            number = int(number)
        return number if self.low <= number <= self.high else None


_NLIST = ParamRule("int", 1, 65536)
_GRAPH = {"M": ParamRule("int", 2, 2048), "efConstruction": ParamRule("int", 1, _INT_MAX)}
_SQ_TYPES = ("SQ6", "SQ8", "BF16", "FP16")
_RANGE = {"radius": ParamRule("float"), "range_filter": ParamRule("float")}

#: Build parameters each index type takes, with the values Milvus accepts (milvus.io/docs, index pages).
BUILD_PARAM_RULES: dict[str, dict[str, ParamRule]] = {
    "FLAT": {},
    "IVF_FLAT": {"nlist": _NLIST},
    "IVF_SQ8": {"nlist": _NLIST},
    "HNSW": dict(_GRAPH),
    "HNSW_SQ": {**_GRAPH, "sq_type": ParamRule("choice", choices=_SQ_TYPES), "refine": ParamRule("bool"),
                "refine_type": ParamRule("choice", choices=(*_SQ_TYPES, "FP32"))},
    "AUTOINDEX": {},
}
#: Search parameters each index type takes (``nprobe`` at most ``nlist`` is checked by :class:`IndexSpec`).
SEARCH_PARAM_RULES: dict[str, dict[str, ParamRule]] = {
    "FLAT": dict(_RANGE),
    "IVF_FLAT": {"nprobe": _NLIST, **_RANGE},
    "IVF_SQ8": {"nprobe": _NLIST, **_RANGE},
    "HNSW": {"ef": ParamRule("int", 1, _INT_MAX), **_RANGE},
    "HNSW_SQ": {"ef": ParamRule("int", 1, _INT_MAX), "refine_k": ParamRule("float", 1), **_RANGE},
    "AUTOINDEX": {"level": ParamRule("int", 1, 10), **_RANGE},
}


def check_index_params(
    kind: str, params: Mapping[str, Any], rules: Mapping[str, ParamRule], what: Literal["build", "search"]
) -> dict[str, Any]:
    """``params`` with each value in its canonical type, after checking names and values against ``rules``.

    Raises:
        ConnectorError: a name the index type does not take (with the nearest valid name), or a value
            out of range or of the wrong type (with what is accepted).
    """
    out: dict[str, Any] = {}
    for name, value in params.items():
        rule = rules.get(str(name))
        if rule is None:
            raise ConnectorError(
                f"index {kind} has no {what} parameter {name!r}{_nearest(str(name), list(rules))}; it takes "
                f"{', '.join(sorted(rules)) or 'none'}"
            )
        coerced = rule.coerce(value)
        if coerced is None:
            example = f" (e.g. '{kind}:{name}={_example(kind, name)}')" if what == "build" else ""
            raise ConnectorError(
                f"index {kind} {what} parameter {name}={value!r} is invalid: it must be {rule.describe()}; "
                f"fix the value{example}"
            )
        out[str(name)] = coerced
    return out


def _nearest(name: str, valid: Sequence[str]) -> str:
    folded = {v.lower(): v for v in valid}
    match = folded.get(name.lower()) or next(iter(difflib.get_close_matches(name, valid, n=1, cutoff=0.5)), None)
    return f" (did you mean {match!r}?)" if match else ""


def _example(kind: str, name: str) -> Any:
    default = {**_BUILD_DEFAULTS[kind], **_SEARCH_DEFAULTS[kind]}.get(name)
    return default if default is not None else "..."


def primary_key(value: str) -> str:
    """The Milvus key of a record id (or content hash): 32 hex digits of BLAKE2b-128.

    Hex keys are safe in filter expressions (record ids with quotes break ``get``/``delete`` in
    Milvus Lite) and stable across runs, so an upsert of the same record overwrites it.
    """
    return hashlib.blake2b(value.encode("utf-8"), digest_size=16).hexdigest()


def primary_keys(values: Sequence[Any]) -> list[str]:
    """:func:`primary_key` of each value (as ``str``)."""
    blake = hashlib.blake2b
    return [blake(str(v).encode("utf-8"), digest_size=16).hexdigest() for v in values]


@dataclass(frozen=True)
class IndexSpec:
    """The vector index: type, build parameters and default search parameters.

    Args:
        index_type: ``FLAT`` (exact), ``IVF_FLAT``, ``IVF_SQ8``, ``HNSW``, ``HNSW_SQ`` or ``AUTOINDEX``
            (the server chooses; the only type on Zilliz Cloud serverless).
        params: build parameters overriding the defaults (``nlist`` for IVF, ``M``/``efConstruction``
            for HNSW, plus ``sq_type``/``refine``/``refine_type`` for HNSW_SQ).
        search_params: search parameters overriding the defaults (``nprobe``, ``ef``).

    Raises:
        ConnectorError: an unknown index type, a parameter the type does not take (naming the nearest
            valid one), or a value outside the range Milvus accepts (see :data:`BUILD_PARAM_RULES`),
            all before any collection is created.
    """

    index_type: IndexType = "AUTOINDEX"
    params: Mapping[str, Any] = field(default_factory=dict)
    search_params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        kind = str(self.index_type).upper()
        if kind not in _BUILD_DEFAULTS:
            raise ConnectorError(f"unknown index type {self.index_type!r}; choose one of {sorted(_BUILD_DEFAULTS)}")
        object.__setattr__(self, "index_type", kind)
        object.__setattr__(self, "params", check_index_params(kind, self.params, BUILD_PARAM_RULES[kind], "build"))
        object.__setattr__(
            self, "search_params", check_index_params(kind, self.search_params, SEARCH_PARAM_RULES[kind], "search")
        )
        nlist, nprobe = self.build_params().get("nlist"), self.search_params.get("nprobe")
        if nlist is not None and nprobe is not None and nprobe > nlist:
            raise ConnectorError(
                f"index {kind} search parameter nprobe={nprobe} is more than nlist={nlist}; Milvus probes at most "
                f"nlist clusters: lower nprobe or raise nlist"
            )

    def build_params(self) -> dict[str, Any]:
        """Defaults of the type updated with ``params``."""
        return {**_BUILD_DEFAULTS[self.index_type], **dict(self.params)}

    def search_defaults(self, top_k: int) -> dict[str, Any]:
        """Search parameters for ``top_k`` results (HNSW's ``ef`` is at least ``top_k``)."""
        out = {**_SEARCH_DEFAULTS[self.index_type], **dict(self.search_params)}
        if self.index_type in ("HNSW", "HNSW_SQ"):
            out["ef"] = max(int(out.get("ef", 64)), top_k)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored in the collection's properties)."""
        return {
            "index_type": self.index_type,
            "params": dict(self.params),
            "search_params": dict(self.search_params),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IndexSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(
            cast(IndexType, data.get("index_type", "AUTOINDEX")),
            dict(data.get("params") or {}),
            dict(data.get("search_params") or {}),
        )

    @classmethod
    def parse(cls, text: str) -> IndexSpec:
        """From the CLI form ``TYPE`` or ``TYPE:key=value,key=value`` (``HNSW:M=32,efConstruction=256``)."""
        kind, _, rest = text.partition(":")
        params: dict[str, Any] = {}
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ConnectorError(
                    f"index option {item!r} in {text!r} is not key=value; write e.g. 'HNSW:M=32,efConstruction=256'"
                )
            params[key.strip()] = _number(value.strip())
        return cls(cast(IndexType, kind.strip().upper()), params)


def _number(text: str) -> int | float | str:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            continue
    return text


@dataclass(frozen=True)
class ScalarField:
    """One scalar field of the collection (fixed or from user metadata)."""

    name: str
    dtype: ScalarType
    max_length: int | None = None
    nullable: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "dtype": self.dtype,
            "max_length": self.max_length,
            "nullable": self.nullable,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScalarField:
        """Inverse of :meth:`to_dict`."""
        return cls(
            str(data["name"]),
            cast(ScalarType, data["dtype"]),
            data.get("max_length"),
            bool(data.get("nullable", False)),
        )


def fingerprint_of(bundle: ModelBundle | BundleCard | Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """The bundle fingerprint of a bundle, a card, a bundle directory or a fingerprint mapping (checked).

    Raises:
        MismatchError: a mapping without ``bundle_id``, ``embedding_dim`` or ``metric``.
    """
    if isinstance(bundle, BundleCard):
        return dict(bundle.fingerprint())
    if isinstance(bundle, str | Path):
        return read_card(bundle).fingerprint()
    card = getattr(bundle, "card", None)
    if isinstance(card, BundleCard):  # a ModelBundle, told by its card so that torch need not be imported
        return dict(card.fingerprint())
    fp = dict(bundle)
    missing = {"bundle_id", "embedding_dim", "metric"} - set(fp)
    if missing:
        raise MismatchError(
            f"the bundle fingerprint lacks {sorted(missing)} (got keys {sorted(fp)}); pass a model "
            f"bundle directory, a ModelBundle, or shards written by 'deepfeat embed'"
        )
    return fp


def _user_type_arrow(t: pa.DataType) -> ScalarType | None:
    if pa.types.is_boolean(t):
        return "BOOL"
    if pa.types.is_integer(t):
        return "INT64"
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "DOUBLE"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        return "VARCHAR"
    if pa.types.is_temporal(t):
        return "VARCHAR"
    return None


def _user_type_pandas(series: pd.Series) -> ScalarType | None:
    dtype = series.dtype
    if pd.api.types.is_bool_dtype(dtype):
        return "BOOL"
    if pd.api.types.is_integer_dtype(dtype):
        return "INT64"
    if pd.api.types.is_float_dtype(dtype):
        return "DOUBLE"
    if pd.api.types.is_datetime64_any_dtype(dtype) or isinstance(dtype, pd.StringDtype):
        return "VARCHAR"
    values = [v for v in series.tolist() if not _missing(v)]
    if not values:
        return "VARCHAR"
    if all(isinstance(v, bool | np.bool_) for v in values):
        return "BOOL"
    if all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values):
        return "INT64"
    if all(isinstance(v, int | float | np.integer | np.floating) for v in values):
        return "DOUBLE"
    if any(isinstance(v, bytes | bytearray | memoryview | np.ndarray | list | dict) for v in values):
        return None
    return "VARCHAR"


def _missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float | np.floating) and math.isnan(value)


def user_fields(
    metadata: pd.DataFrame | pa.Schema | None,
    *,
    columns: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> tuple[ScalarField, ...]:
    """Scalar fields for the user metadata columns of a record table or a shard schema.

    Strings become ``VARCHAR`` (a missing value is stored as ``""``), booleans ``BOOL``, integers
    ``INT64`` and floats ``DOUBLE`` (nullable, except the record contract's ``is_query``/``is_gallery``).
    Columns of other kinds (lists, arrays, bytes) are skipped with a warning.

    Raises:
        DataError: a requested column is missing, or a column name is not a valid Milvus field name.
    """
    if metadata is None:
        return ()
    names = list(metadata.names) if isinstance(metadata, pa.Schema) else [str(c) for c in metadata.columns]
    if columns is not None:
        absent = [c for c in columns if c not in names]
        if absent:
            raise DataError(f"metadata column(s) {absent} are not in the data (columns: {names})")
        wanted = [c for c in columns if c not in _NOT_USER]
    else:
        wanted = [c for c in names if c not in _NOT_USER and c not in exclude and not c.startswith("__")]
    bad = [c for c in wanted if not _NAME.match(c)]
    if bad:
        raise DataError(
            f"column name(s) {bad} are not valid Milvus field names (letters, digits and '_', not "
            f"starting with a digit); rename them or leave them out with exclude=[...] "
            f"(--exclude-columns)"
        )
    out: list[ScalarField] = []
    for name in wanted:
        if isinstance(metadata, pa.Schema):
            dtype = _user_type_arrow(metadata.field(name).type)
        else:
            dtype = _user_type_pandas(metadata[name])
        if dtype is None:
            log.warning(
                "metadata column %r is not a scalar (lists, arrays or bytes); it is not stored in Milvus",
                name,
            )
            continue
        if dtype == "VARCHAR":
            out.append(ScalarField(name, "VARCHAR", USER_VARCHAR_LENGTH))
        else:
            out.append(ScalarField(name, dtype, nullable=name not in _NON_NULL_BOOLS))
    return tuple(out)


@dataclass(frozen=True)
class CollectionSpec:
    """Everything needed to create (and check) a collection of deepfeat embeddings.

    Build one with :meth:`from_bundle`; read one back from an existing collection with
    :meth:`from_description`.
    """

    name: str
    dim: int
    metric: Metric
    fingerprint: Mapping[str, Any]
    fields: tuple[ScalarField, ...] = ()
    index: IndexSpec = field(default_factory=IndexSpec)
    key: KeyMode = "record_id"
    #: The primary key and vector field names: ``pk`` and ``vector`` in deepfeat's own collections;
    #: whatever the schema says in a collection deepfeat did not create (see :meth:`from_description`).
    pk_field: str = PK_FIELD
    pk_type: ScalarType = "VARCHAR"
    vector_field: str = VECTOR_FIELD
    #: False for a collection deepfeat did not create: searchable by vector, never written by deepfeat.
    managed: bool = True
    #: Whether rows may carry fields outside the schema (MilvusClient's quick setup turns this on).
    dynamic: bool = False

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConnectorError(
                f"{self.name!r} is not a valid collection name (letters, digits and '_', not "
                f"starting with a digit, at most 255 characters)"
            )
        if self.key not in ("record_id", "content_hash"):
            raise ConnectorError(f"key must be 'record_id' or 'content_hash', got {self.key!r}")
        if self.metric not in ("COSINE", "IP", "L2"):
            raise MismatchError(
                f"metric {self.metric!r} is not one Milvus supports for float vectors "
                f"(COSINE, IP, L2); re-export the bundle"
            )

    @classmethod
    def from_bundle(
        cls,
        name: str,
        bundle: ModelBundle | BundleCard | Mapping[str, Any] | str | Path,
        *,
        metadata: pd.DataFrame | pa.Schema | None = None,
        columns: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        index: IndexSpec | str | None = None,
        key: KeyMode = "record_id",
    ) -> CollectionSpec:
        """The spec of a collection for ``bundle``'s embeddings.

        Args:
            name: collection name.
            bundle: a :class:`ModelBundle`, its card, its directory, or a fingerprint dict (as stored in
                shard metadata).
            metadata: a record table or a shard schema, whose extra columns become scalar fields.
            columns: only these metadata columns (default: all scalar ones).
            exclude: metadata columns to leave out.
            index: an :class:`IndexSpec`, or its CLI form (``"HNSW:M=32"``); default ``AUTOINDEX``.
            key: derive the primary key from the ``record_id`` (one row per record) or the
                ``content_hash`` (identical images collapse into one row).
        """
        fp = fingerprint_of(bundle)
        idx = IndexSpec.parse(index) if isinstance(index, str) else (index or IndexSpec())
        fields = [ScalarField(n, "VARCHAR", length) for n, length in FIXED_FIELDS.items()]
        fields.extend(user_fields(metadata, columns=columns, exclude=exclude))
        return cls(
            name=name,
            dim=int(fp["embedding_dim"]),
            metric=cast(Metric, str(fp["metric"]).upper()),
            fingerprint=fp,
            fields=tuple(fields),
            index=idx,
            key=key,
        )

    def with_name(self, name: str) -> CollectionSpec:
        """The same spec for another collection name."""
        return replace(self, name=name)

    @property
    def field_names(self) -> list[str]:
        """Scalar field names (no key, no vector)."""
        return [f.name for f in self.fields]

    def field_type(self, name: str) -> ScalarType:
        """The type of the scalar field (or the primary key) ``name``.

        Raises:
            DataError: the collection has no such field (its fields are named).
        """
        if name == self.pk_field:
            return self.pk_type
        for f in self.fields:
            if f.name == name:
                return f.dtype
        raise DataError(f"collection {self.name!r} has no field {name!r}; its fields are {self.field_names}")

    def properties(self) -> dict[str, str]:
        """Collection properties recording the bundle and the spec (JSON strings)."""
        spec = {
            "format": SPEC_FORMAT,
            "key": self.key,
            "index": self.index.to_dict(),
            "fields": [f.to_dict() for f in self.fields],
        }
        return {
            PROP_BUNDLE: json.dumps(dict(self.fingerprint), sort_keys=True),
            PROP_SPEC: json.dumps(spec, sort_keys=True),
        }

    @classmethod
    def from_description(
        cls, desc: Mapping[str, Any], *, index: Mapping[str, Any] | None = None, foreign_ok: bool = False
    ) -> CollectionSpec:
        """Read the spec back from ``describe_collection``'s result.

        A collection deepfeat did not create (made with a plain ``MilvusClient``, or filled through
        :class:`~deepfeat.connectors.plugin.DeepfeatImageEmbeddingFunction`) is read from its schema when
        ``foreign_ok``: its one ``FLOAT_VECTOR`` field and primary key, its scalar fields, the metric of its
        vector index (``index``: ``describe_index``'s result) and the bundle fingerprint if one was recorded
        (:meth:`DeepfeatImageEmbeddingFunction.record_bundle`); the spec has ``managed=False``.

        Raises:
            ConnectorError: the collection was not created by deepfeat (and ``foreign_ok`` is False), or,
                foreign, it has no single float vector field or no vector index.
        """
        name = str(desc.get("collection_name", "?"))
        props = dict(desc.get("properties") or {})
        schema_fields = list(desc.get("fields") or [])
        pk_name = next((str(f["name"]) for f in schema_fields if f.get("is_primary")), PK_FIELD)
        vectors = [f for f in schema_fields if _type_name(f) == "FLOAT_VECTOR"]
        ours = PROP_BUNDLE in props and pk_name == PK_FIELD and all(f["name"] == VECTOR_FIELD for f in vectors)
        if not ours:
            if not foreign_ok:
                raise ConnectorError(
                    f"collection {name!r} records no model bundle (no {PROP_BUNDLE!r} property): it "
                    f"was not created by deepfeat. Load into a new collection name, or drop it first "
                    f"(searching it by vector works as it is)"
                )
            return cls._foreign(name, props, schema_fields, vectors, pk_name, index, desc.get("enable_dynamic_field"))
        fp = _json_property(name, props, PROP_BUNDLE)
        spec = _json_property(name, props, PROP_SPEC) if PROP_SPEC in props else {}
        fields = tuple(ScalarField.from_dict(f) for f in spec.get("fields", []))
        if not fields:  # recover the fields from the schema itself
            fields = tuple(
                _field_from_schema(f) for f in schema_fields if f.get("name") not in (PK_FIELD, VECTOR_FIELD)
            )
        return cls(
            name=name,
            dim=int(fp["embedding_dim"]),
            metric=cast(Metric, str(fp["metric"]).upper()),
            fingerprint=fp,
            fields=fields,
            index=IndexSpec.from_dict(spec.get("index", {})),
            key=cast(KeyMode, spec.get("key", "record_id")),
        )

    @classmethod
    def _foreign(
        cls,
        name: str,
        props: Mapping[str, Any],
        schema_fields: Sequence[Mapping[str, Any]],
        vectors: Sequence[Mapping[str, Any]],
        pk_name: str,
        index: Mapping[str, Any] | None,
        dynamic: Any,
    ) -> CollectionSpec:
        if len(vectors) != 1:
            kinds = sorted({_type_name(f) for f in schema_fields if "VECTOR" in _type_name(f)})
            raise ConnectorError(
                f"collection {name!r} has {len(vectors)} FLOAT_VECTOR fields (vector fields: {kinds or 'none'}); "
                f"deepfeat searches collections with exactly one float vector field"
            )
        vector = vectors[0]
        metric = str((index or {}).get("metric_type") or "").upper()
        if not metric:
            raise ConnectorError(
                f"collection {name!r} has no index on its vector field {vector['name']!r}, so its metric is "
                f"unknown; create one (client.create_index) before searching it"
            )
        fp = _json_property(name, props, PROP_BUNDLE) if PROP_BUNDLE in props else {}
        fields = tuple(
            _field_from_schema(f)
            for f in schema_fields
            if f.get("name") not in (pk_name, vector["name"]) and _type_name(f) in _FOREIGN_SCALARS
        )
        return cls(
            name=name,
            dim=int((vector.get("params") or {})["dim"]),
            metric=cast(Metric, metric),
            fingerprint=fp,
            fields=fields,
            index=IndexSpec.from_dict({"index_type": str((index or {}).get("index_type") or "AUTOINDEX").upper()}),
            pk_field=pk_name,
            pk_type=_FOREIGN_SCALARS.get(
                next((_type_name(f) for f in schema_fields if f.get("name") == pk_name), "VARCHAR"), "VARCHAR"
            ),
            vector_field=str(vector["name"]),
            managed=False,
            dynamic=bool(dynamic),
        )

    def check_bundle(self, bundle: ModelBundle | BundleCard | Mapping[str, Any] | str | Path, *, what: str) -> None:
        """Refuse a bundle whose fingerprint differs from the one that filled this collection.

        A collection deepfeat did not create, and on which no bundle was recorded, cannot show that
        ``bundle`` filled it: images embedded by ``bundle`` could be compared with vectors of another model
        (or another preprocessing), so that is refused too, with the two ways out.

        Raises:
            MismatchError: dim, metric, preprocessing or bundle id differ (each named, with the fix), or
                the collection records no bundle to compare with.
        """
        if self.fingerprint:
            check_compatible(dict(self.fingerprint), fingerprint_of(bundle), what=f"{what} collection {self.name!r}")
            return
        fp = fingerprint_of(bundle)
        if int(fp["embedding_dim"]) != self.dim or str(fp["metric"]).upper() != self.metric:
            raise MismatchError(
                f"{what} collection {self.name!r}: it holds {self.dim}-d {self.metric} vectors, the bundle "
                f"{fp.get('bundle_id')!r} makes {fp['embedding_dim']}-d {fp['metric']} ones; use the model that "
                f"filled it"
            )
        raise MismatchError(
            f"{what} collection {self.name!r}: it was not created by deepfeat and records no model bundle, so "
            f"nothing shows that bundle {fp.get('bundle_id')!r} (and its preprocessing) filled it. If it did, "
            f"record it once with DeepfeatImageEmbeddingFunction(bundle).record_bundle(client, {self.name!r}); "
            f"otherwise search it by vector (--vector-file) without --bundle"
        )

    def check_fields(self, columns: Sequence[str]) -> None:
        """Log metadata columns that the collection has no field for (they are not stored)."""
        extra = [c for c in columns if c not in _NOT_USER and c not in self.field_names and not c.startswith("__")]
        if extra:
            log.warning(
                "columns %s have no field in collection %r and are not stored; re-create the collection to add them",
                extra,
                self.name,
            )

    def to_schema(self) -> Any:
        """The :class:`pymilvus.CollectionSchema` (no ``auto_id``, no dynamic fields)."""
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(
            auto_id=False,
            enable_dynamic_field=False,
            description=f"deepfeat embeddings of {self.fingerprint.get('bundle_id')}",
        )
        schema.add_field(PK_FIELD, DataType.VARCHAR, is_primary=True, max_length=PK_LENGTH)
        schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=self.dim)
        for f in self.fields:
            kw: dict[str, Any] = {"nullable": True} if f.nullable else {}
            if f.dtype == "VARCHAR":
                schema.add_field(f.name, DataType.VARCHAR, max_length=f.max_length or USER_VARCHAR_LENGTH, **kw)
            else:
                schema.add_field(f.name, getattr(DataType, f.dtype), **kw)
        return schema

    def index_params(self, client: Any) -> Any:
        """Index parameters for ``client.create_index``, with build parameters nested.

        Milvus Lite reads build parameters only from a nested ``params`` entry and drops flat ones
        silently; real Milvus reads the nested form too.
        """
        ip = client.prepare_index_params()
        build = self.index.build_params()
        kw: dict[str, Any] = {"params": {"params": build}} if build else {}
        ip.add_index(
            field_name=VECTOR_FIELD,
            index_type=self.index.index_type,
            metric_type=self.metric,
            index_name=VECTOR_FIELD,
            **kw,
        )
        return ip

    def encode(self, table: pa.Table | pa.RecordBatch | pd.DataFrame, vectors: np.ndarray) -> list[dict[str, Any]]:
        """Rows ready for ``upsert``: key, vector, fixed and user fields.

        Raises:
            DataError: no ``id`` column, a non-finite vector (named by record id), a too-long string.
            MismatchError: vectors of another dim.
        """
        return _encode_rows(self, table, vectors)


#: Scalar types of foreign collections, as the type of their filter literals.
_FOREIGN_SCALARS: dict[str, ScalarType] = {
    "VARCHAR": "VARCHAR", "BOOL": "BOOL", "INT8": "INT64", "INT16": "INT64", "INT32": "INT64", "INT64": "INT64",
    "FLOAT": "DOUBLE", "DOUBLE": "DOUBLE",
}


def _type_name(f: Mapping[str, Any]) -> str:
    return str(getattr(f.get("type"), "name", f.get("type")))


def _json_property(name: str, props: Mapping[str, Any], key: str) -> dict[str, Any]:
    try:
        value = json.loads(props[key])
    except json.JSONDecodeError as exc:
        raise ConnectorError(
            f"collection {name!r} has a damaged {key!r} property ({exc}); re-create "
            f"it with 'deepfeat sync --reindex-alias'"
        ) from exc
    if not isinstance(value, dict):
        raise ConnectorError(f"collection {name!r} has a damaged {key!r} property (not a JSON object); re-create it")
    return value


def _field_from_schema(f: Mapping[str, Any]) -> ScalarField:
    kind = _FOREIGN_SCALARS.get(_type_name(f), "VARCHAR")
    return ScalarField(str(f["name"]), kind, (f.get("params") or {}).get("max_length"), bool(f.get("nullable")))


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
            values = [None if _missing(v) else v for v in values]
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


def _encode_rows(
    spec: CollectionSpec, table: pa.Table | pa.RecordBatch | pd.DataFrame, vectors: np.ndarray
) -> list[dict[str, Any]]:
    n = len(table)
    ids = _column(table, "id", n)
    if ids is None:
        ids = _column(table, RECORD_ID_FIELD, n)
    if ids is None:
        raise DataError("records have no 'id' column; every record needs a stable id (see docs/contracts.md)")
    ids = [str(i) for i in ids]
    vecs = check_vectors(vectors, spec.dim, ids, where=f"collection {spec.name!r}")
    if spec.key == "content_hash":
        hashes = _column(table, "content_hash", n)
        if hashes is None or any(not h for h in hashes):
            raise DataError(
                f"collection {spec.name!r} is keyed by content hash, but some records have none; "
                f"embed them with 'deepfeat embed' (which adds content_hash) or key by record id"
            )
        keys = primary_keys(hashes)
    else:
        keys = primary_keys(ids)
    columns: dict[str, list[Any]] = {PK_FIELD: keys}
    version = str(spec.fingerprint.get("bundle_id", ""))
    for f in spec.fields:
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
            return [default if _missing(v) else bool(v) for v in raw]
        if f.dtype == "INT64":
            return [default if _missing(v) else int(v) for v in raw]
        return [default if _missing(v) else float(v) for v in raw]
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"field {f.name!r} is {f.dtype} in the collection, but a value does not convert ({exc}); "
            f"fix the column's values, or leave the column out"
        ) from exc
