"""Create, open, check, describe and drop deepfeat collections."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from deepfeat.connectors.client import MilvusConnector
from deepfeat.connectors.fields import VECTOR_FIELD
from deepfeat.connectors.schema import PROP_BUNDLE, CollectionSpec
from deepfeat.finetune.errors import ConnectorError
from deepfeat.finetune.models.card import BundleCard

if TYPE_CHECKING:  # the bundle module imports torch; listing or describing a collection never needs it
    from deepfeat.finetune.models.bundle import ModelBundle

log = logging.getLogger(__name__)

BundleLike: TypeAlias = "ModelBundle | BundleCard | Mapping[str, Any] | str | Path"


def open_collection(
    conn: MilvusConnector,
    name: str,
    *,
    bundle: BundleLike | None = None,
    what: str = "using",
    foreign_ok: bool = False,
) -> CollectionSpec:
    """The spec of an existing collection (an alias resolves to its collection), checked against ``bundle``.

    Args:
        foreign_ok: also read a collection deepfeat did not create (a plain ``MilvusClient`` one, or one
            filled through :class:`~deepfeat.connectors.plugin.DeepfeatImageEmbeddingFunction`) from its
            schema and vector index, for searching it (``spec.managed`` is False); writers leave it False.

    Raises:
        ConnectorError: no such collection, or not a deepfeat collection (and not ``foreign_ok``).
        MismatchError: ``bundle`` is not the one that filled it (or a foreign collection records none).
    """
    target = conn.resolve_alias(name)
    desc = conn.describe(target)
    try:
        spec = CollectionSpec.from_description(desc)
    except ConnectorError:
        if not foreign_ok:
            raise
        spec = CollectionSpec.from_description(desc, index=_vector_index(conn, target, desc), foreign_ok=True)
    if bundle is not None:
        spec.check_bundle(bundle, what=what)
    return spec


def _vector_index(conn: MilvusConnector, name: str, desc: Mapping[str, Any]) -> dict[str, Any] | None:
    """``describe_index`` of a collection's one float vector field (None: no such field or no index)."""
    fields = [f for f in desc.get("fields") or [] if str(getattr(f.get("type"), "name", "")) == "FLOAT_VECTOR"]
    if len(fields) != 1:
        return None
    for index_name in conn.call("list_indexes", conn.client.list_indexes, name):
        desc_index = dict(conn.call("describe_index", conn.client.describe_index, name, index_name) or {})
        if desc_index.get("field_name", index_name) == fields[0]["name"]:
            return desc_index
    return None


def create_collection(
    conn: MilvusConnector,
    spec: CollectionSpec,
    *,
    exist_ok: bool = True,
    load: bool = True,
    index: bool = True,
) -> CollectionSpec:
    """Create ``spec``'s collection, or check the existing one against it.

    The bundle fingerprint and the spec go into the collection's properties and are read back; the
    index build parameters are read back from the server too, so a parameter that did not reach it
    is an error, not a silently different index.

    Args:
        exist_ok: an existing collection of the same bundle is fine (its spec is returned).
        load: load the collection (searchable at once).
        index: create the vector index now (a bulk import may prefer to index after the data).

    Raises:
        MismatchError: the existing collection was filled by another bundle.
        ConnectorError: it exists and ``exist_ok`` is False, or the server dropped properties or params.
    """
    if conn.has_collection(spec.name):
        if not exist_ok:
            raise ConnectorError(
                f"collection {spec.name!r} already exists at {conn.display_uri}; choose another "
                f"name or drop it ('deepfeat collections drop {spec.name} --yes')"
            )
        existing = open_collection(conn, spec.name, bundle=spec.fingerprint, what="writing to")
        if existing.key != spec.key:
            raise ConnectorError(
                f"collection {spec.name!r} is keyed by {existing.key}, not {spec.key}; use the same "
                f"key mode, or a new collection"
            )
        return existing
    client = conn.client
    conn.call(
        "create_collection",
        client.create_collection,
        spec.name,
        schema=spec.to_schema(),
        properties=spec.properties(),
    )
    log.info(
        "created collection %s (dim %d, %s, index %s) at %s",
        spec.name,
        spec.dim,
        spec.metric,
        spec.index.index_type,
        conn.display_uri,
    )
    _check_properties(conn, spec)
    if index:
        create_index(conn, spec, load=load)
    return spec


def _check_properties(conn: MilvusConnector, spec: CollectionSpec) -> None:
    got = dict(conn.describe(spec.name).get("properties") or {})
    if got.get(PROP_BUNDLE) != spec.properties()[PROP_BUNDLE]:
        raise ConnectorError(
            f"Milvus at {conn.display_uri} did not keep the collection property {PROP_BUNDLE!r} "
            f"of {spec.name!r}; deepfeat needs collection properties (Milvus >= 2.3 or Milvus "
            f"Lite) to record which model filled a collection"
        )


def _read_index_params(desc: Mapping[str, Any]) -> dict[str, Any]:
    params: Any = desc.get("params", {})
    if isinstance(params, str):
        try:
            params = json.loads(params)
        except json.JSONDecodeError:
            params = {}
    out = dict(params) if isinstance(params, Mapping) else {}
    for k, v in desc.items():  # servers that flatten the build params
        if k not in (
            "params",
            "index_type",
            "metric_type",
            "field_name",
            "index_name",
            "total_rows",
            "indexed_rows",
            "pending_index_rows",
            "state",
        ):
            out.setdefault(k, v)
    return out


def verify_index(conn: MilvusConnector, spec: CollectionSpec) -> dict[str, Any]:
    """Read the vector index back and check its type, metric and build parameters.

    Raises:
        ConnectorError: the server reports other parameters than were sent (e.g. dropped ones).
    """
    desc = conn.call("describe_index", conn.client.describe_index, spec.name, VECTOR_FIELD)
    if not desc:
        raise ConnectorError(
            f"collection {spec.name!r} has no vector index; create it with deepfeat.connectors.create_index()"
        )
    got = _read_index_params(desc)
    kind = str(desc.get("index_type", "")).upper()
    problems = []
    if kind != spec.index.index_type and spec.index.index_type != "AUTOINDEX":
        problems.append(f"index_type {kind!r} != {spec.index.index_type!r}")
    if str(desc.get("metric_type", spec.metric)).upper() != spec.metric:
        problems.append(f"metric {desc.get('metric_type')!r} != {spec.metric!r}")
    for key, value in spec.index.build_params().items():
        if str(got.get(key)) != str(value):
            problems.append(f"{key}={got.get(key)!r} (sent {value!r})")
    if problems:
        raise ConnectorError(
            f"the vector index of {spec.name!r} at {conn.display_uri} differs from what was sent: "
            f"{'; '.join(problems)}. The server dropped or changed build parameters; check the "
            f"index type is supported there"
        )
    return dict(desc)


def create_index(conn: MilvusConnector, spec: CollectionSpec, *, load: bool = True, timeout: float = 3600.0) -> None:
    """Create (or re-create with ``spec.index``) the vector index, check it, and load the collection."""
    client = conn.client
    existing = conn.call("list_indexes", client.list_indexes, spec.name)
    if VECTOR_FIELD in existing:
        current = conn.call("describe_index", client.describe_index, spec.name, VECTOR_FIELD)
        if str(current.get("index_type", "")).upper() == spec.index.index_type:
            try:
                verify_index(conn, spec)
                if load:
                    conn.ensure_loaded(spec.name)
                return
            except ConnectorError:
                pass
        conn.call("release_collection", client.release_collection, spec.name)
        conn.forget_loaded(spec.name)
        conn.call("drop_index", client.drop_index, spec.name, VECTOR_FIELD)
    # sync=False: pymilvus' own wait calls AllocTimestamp, which Milvus Lite does not implement (its
    # server logs an error each time); the state is polled here instead.
    conn.call("create_index", client.create_index, spec.name, spec.index_params(client), sync=False)
    wait_for_index(conn, spec.name, timeout=timeout)
    verify_index(conn, spec)
    if load:
        conn.ensure_loaded(spec.name)


def wait_for_index(conn: MilvusConnector, name: str, *, timeout: float = 3600.0, interval: float = 0.2) -> None:
    """Poll the vector index of ``name`` until it is built.

    Raises:
        ConnectorError: the build failed, or is still running at ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        desc = conn.call("describe_index", conn.client.describe_index, name, VECTOR_FIELD) or {}
        state = str(desc.get("state", "Finished"))
        if state == "Finished":
            return
        if state == "Failed":
            raise ConnectorError(f"building the vector index of {name!r} failed: {desc.get('index_state_fail_reason')}")
        if time.monotonic() > deadline:
            raise ConnectorError(
                f"the vector index of {name!r} is still {state} after {timeout:.0f}s "
                f"({desc.get('indexed_rows')} of {desc.get('total_rows')} rows); wait and retry"
            )
        time.sleep(interval)
        interval = min(interval * 2, 5.0)


@dataclass(frozen=True)
class CollectionInfo:
    """A collection as the ``collections`` command lists it."""

    name: str
    rows: int | None
    bundle_id: str | None
    dim: int | None
    metric: str | None
    index_type: str | None
    aliases: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        return {
            "name": self.name,
            "rows": self.rows,
            "bundle_id": self.bundle_id,
            "dim": self.dim,
            "metric": self.metric,
            "index_type": self.index_type,
            "aliases": list(self.aliases),
        }


def collection_info(conn: MilvusConnector, name: str) -> CollectionInfo:
    """Rows, bundle, dim, metric, index type and aliases of one collection."""
    target = conn.resolve_alias(name)
    desc = conn.describe(target)
    try:
        spec: CollectionSpec | None = CollectionSpec.from_description(desc)
    except ConnectorError:
        spec = None
    try:
        rows: int | None = conn.count(target)
    except ConnectorError:
        rows = None
    return CollectionInfo(
        name=target,
        rows=rows,
        bundle_id=str(spec.fingerprint.get("bundle_id")) if spec else None,
        dim=spec.dim if spec else None,
        metric=spec.metric if spec else None,
        index_type=spec.index.index_type if spec else None,
        aliases=tuple(conn.list_aliases(target)),
    )


def list_collections(conn: MilvusConnector) -> list[CollectionInfo]:
    """Every collection with its info."""
    names = sorted(conn.call("list_collections", conn.client.list_collections))
    return [collection_info(conn, n) for n in names]


def describe_collection(conn: MilvusConnector, name: str) -> dict[str, Any]:
    """Info, stored bundle fingerprint, fields and index of one collection, as plain data."""
    target = conn.resolve_alias(name)
    spec = CollectionSpec.from_description(conn.describe(target))
    info = collection_info(conn, target)
    index = conn.call("describe_index", conn.client.describe_index, target, VECTOR_FIELD)
    return {
        **info.to_dict(),
        "key": spec.key,
        "fingerprint": dict(spec.fingerprint),
        "fields": [f.to_dict() for f in spec.fields],
        "index": {k: v for k, v in dict(index or {}).items()},
    }


def drop_collection(conn: MilvusConnector, name: str) -> None:
    """Drop a collection (not an alias: dropping through an alias is refused)."""
    if name in conn.list_aliases():
        raise ConnectorError(
            f"{name!r} is an alias (of {conn.resolve_alias(name)!r}); drop the collection by its own name"
        )
    conn.describe(name)
    aliases = conn.list_aliases(name)
    if aliases:
        raise ConnectorError(
            f"collection {name!r} is served through alias(es) {aliases}; point them at another "
            f"collection (or drop them) first, so that no client loses its collection"
        )
    conn.call("drop_collection", conn.client.drop_collection, name)
    conn.forget_loaded(name)
    log.info("dropped collection %s at %s", name, conn.display_uri)
