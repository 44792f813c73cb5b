"""Collection specs derived from a model bundle.

A :class:`CollectionSpec` fixes everything a collection of deepfeat embeddings needs: a stable
``VARCHAR`` primary key (a BLAKE2b digest of the record id or of the content hash, never ``auto_id``,
so a re-run overwrites instead of duplicating, and keys never contain quotes), a ``FLOAT_VECTOR`` of the
bundle's dim and metric, scalar fields from the record metadata, and an index whose build parameters
are sent nested (``{"params": {...}}``), the only form Milvus Lite does not silently drop, and checked
after creation. The bundle fingerprint and the spec are stored as collection properties, so a
collection knows which model filled it and refuses another.

The field names and keys live in :mod:`deepfeat.connectors.fields`, the index parameters in
:mod:`deepfeat.connectors.index` and the row encoding in :mod:`deepfeat.connectors.rows`; their public
names are re-exported here.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import pandas as pd
import pyarrow as pa

from deepfeat.connectors.fields import (
    FIXED_FIELDS,
    MODEL_VERSION_FIELD,
    PK_FIELD,
    PK_LENGTH,
    RECORD_ID_FIELD,
    USER_VARCHAR_LENGTH,
    VECTOR_FIELD,
    KeyMode,
    ScalarField,
    ScalarType,
    primary_key,
    primary_keys,
)
from deepfeat.connectors.index import (
    BUILD_PARAM_RULES,
    SEARCH_PARAM_RULES,
    IndexSpec,
    IndexType,
    ParamRule,
    check_index_params,
)
from deepfeat.connectors.rows import check_vectors, encode_rows, is_missing
from deepfeat.finetune.errors import ConnectorError, DataError, MismatchError
from deepfeat.finetune.models.card import BundleCard, check_compatible, read_card

if TYPE_CHECKING:  # the bundle module imports torch; a card is all a schema needs
    from deepfeat.finetune.models.bundle import ModelBundle

__all__ = [  # the names defined here, and those that moved out and are still imported from here
    "BUILD_PARAM_RULES",
    "FIXED_FIELDS",
    "MODEL_VERSION_FIELD",
    "PK_FIELD",
    "PK_LENGTH",
    "PROP_BUNDLE",
    "PROP_SPEC",
    "RECORD_ID_FIELD",
    "SEARCH_PARAM_RULES",
    "SPEC_FORMAT",
    "USER_VARCHAR_LENGTH",
    "VECTOR_FIELD",
    "CollectionSpec",
    "IndexSpec",
    "IndexType",
    "KeyMode",
    "Metric",
    "ParamRule",
    "ScalarField",
    "ScalarType",
    "check_index_params",
    "check_vectors",
    "encode_rows",
    "fingerprint_of",
    "primary_key",
    "primary_keys",
    "user_fields",
]

log = logging.getLogger(__name__)

SPEC_FORMAT = 1
PROP_BUNDLE = "deepfeat.bundle"
PROP_SPEC = "deepfeat.spec"

#: Record columns that never become user fields (they are fixed fields, the vector, or pixels).
_NOT_USER = {"id", "image", VECTOR_FIELD, PK_FIELD, *FIXED_FIELDS}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
_NON_NULL_BOOLS = {"is_query", "is_gallery"}

Metric = Literal["COSINE", "IP", "L2"]


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
    values = [v for v in series.tolist() if not is_missing(v)]
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
        return encode_rows(
            table,
            vectors,
            collection=self.name,
            dim=self.dim,
            fields=self.fields,
            key=self.key,
            fingerprint=self.fingerprint,
        )


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
