"""The fields of a deepfeat collection: their names and types, and the primary key of a record.

Shared by the collection spec (:mod:`deepfeat.connectors.schema`), the row encoder
(:mod:`deepfeat.connectors.rows`) and the loaders, so that none of them imports another for a name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

#: The primary key and vector field names of deepfeat's own collections.
PK_FIELD = "pk"
VECTOR_FIELD = "vector"
RECORD_ID_FIELD = "record_id"
MODEL_VERSION_FIELD = "model_version"
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
#: Max length (UTF-8 bytes) of a string field made from a user metadata column.
USER_VARCHAR_LENGTH = 2048

#: What the primary key is derived from: one row per record id, or one per distinct image content.
KeyMode = Literal["record_id", "content_hash"]
ScalarType = Literal["VARCHAR", "INT64", "DOUBLE", "BOOL"]


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

