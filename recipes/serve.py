"""``deepfeat serve``: a local web page to judge retrieval by looking.

Drop or pick a query image and see the top-k hits of a collection as a grid with scores and metadata;
filter by metadata fields, group by one, and compare two collections (off-the-shelf vs fine-tuned)
side by side. :func:`create_app` builds the FastAPI app; the page is plain HTML and JavaScript served
from ``deepfeat/recipes/static`` (nothing from a CDN).

Safety, because the page reads files and runs a model for whoever can reach the port:

* it listens on ``127.0.0.1`` unless ``--allow-remote`` is given, and answers only requests whose
  ``Host`` is a loopback name (a DNS-rebinding page cannot read it through the browser);
* filters are built from ``(field, op, value)`` triples checked against the collection's schema and
  quoted here, never from raw user text;
* an image is served only for a primary key of the collection, from the path stored for that key,
  decoded and re-encoded as PNG (never the raw file bytes), and a relative path may not leave
  ``image_root``;
* uploads are limited in bytes (413) before they are parsed, and in pixels (decompression bombs, 400).

Milvus Lite lets one process open a ``.db``: the server opens one connector per distinct URI and the
panels share it, so both collections of a comparison may live in the same ``.db``.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations at run time,
# and the endpoints are closures over lazily imported FastAPI types (the CLI must load without the
# ``serve`` extra).

import argparse
import base64
import contextlib
import io
import ipaddress
import json
import logging
import math
import os
import random
import re
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

from deepfeat.connectors.search import quote_string
from deepfeat.finetune.errors import DataError, DeepfeatError, MissingExtraError

if TYPE_CHECKING:
    import numpy as np
    from fastapi import FastAPI
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from deepfeat.connectors.client import MilvusConnector
    from deepfeat.connectors.schema import CollectionSpec
    from deepfeat.finetune.models.bundle import ModelBundle

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
#: Largest upload, in bytes (HTTP 413 above it).
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
#: Largest top-k the page asks for.
MAX_TOP_K = 100
MAX_GROUP_SIZE = 10
MAX_FILTERS = 16
MAX_FILTER_VALUE = 1024
THUMBNAIL_SIZE = 256
#: Host names a loopback-only server answers to (DNS-rebinding guard).
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
#: Fields never offered in the page's filters and never sent back with a hit.
HIDDEN_FIELDS = frozenset({"content_hash", "model_version"})
#: Distinct values listed for a field in the page's filter suggestions (more: free text).
MAX_SUGGESTIONS = 50
SUGGESTION_ROWS = 2000
#: Rows sampled from for the "examples" strip (one query at a random offset).
EXAMPLE_POOL = 200
_MAX_QUERY_WINDOW = 16384  # Milvus: offset + limit of one query
_PK = re.compile(r"^[0-9a-f]{32}$")

Op = Literal["==", "!=", "<", "<=", ">", ">="]
OPS: tuple[str, ...] = get_args(Op)
_ORDERING = frozenset({"<", "<=", ">", ">="})
_GROUPABLE = frozenset({"VARCHAR", "INT64", "BOOL"})


class NotFoundError(DataError):
    """A record, a key or an image file the request names is not there (HTTP 404)."""


class PayloadTooLargeError(DataError):
    """An upload above the byte limit (HTTP 413)."""


# --------------------------------------------------------------------------------------------------
# requests: filters and search parameters, validated and quoted here


@dataclass(frozen=True)
class PanelConfig:
    """One side of the page: a collection and the model bundle that filled it.

    Args:
        label: the panel's title ("off-the-shelf", "fine-tuned").
        uri: a Milvus Lite ``.db`` path or ``http(s)://host:19530``.
        collection: collection or alias.
        bundle: the model bundle directory that filled the collection (checked at start).
        image_root: the folder that relative ``path`` values of the collection are relative to;
            images are served from inside it only.
    """

    label: str
    uri: str
    collection: str
    bundle: str | Path
    image_root: str | Path | None = None


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
    raw_filters = data.get("filters") or []
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
        filters=tuple(filters),
        record_id=record_id,
        include_self=include_self,
    )


def _literal(spec: "CollectionSpec", cond: Condition) -> str:
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


def build_filter(spec: "CollectionSpec", conditions: Sequence[Condition]) -> str | None:
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
        if cond.op in _ORDERING and dtype not in ("INT64", "DOUBLE"):
            raise DataError(f"operator {cond.op} needs a numeric field; {cond.field!r} is {dtype} (use == or !=)")
        parts.append(f"{cond.field} {cond.op} {_literal(spec, cond)}")
    return " and ".join(parts) if parts else None


def _check_group_by(spec: "CollectionSpec", field: str | None) -> None:
    if field is None:
        return
    kinds = {f.name: f.dtype for f in spec.fields}
    if field not in kinds:
        raise DataError(f"cannot group by {field!r}: collection {spec.name!r} has fields {spec.field_names}")
    if kinds[field] not in _GROUPABLE:
        raise DataError(f"cannot group by {field!r}: it is {kinds[field]}; Milvus groups by text, integer or boolean")


def resolve_image_path(stored: str, image_root: str | Path | None) -> Path:
    """The file a stored ``path`` value names.

    A relative value is taken relative to ``image_root`` (or the working directory when there is
    none) and may not leave it (``../`` or a link out of it).

    Raises:
        NotFoundError: no path stored, a path outside ``image_root``, or no such file.
    """
    if not stored:
        raise NotFoundError(
            "this record has no image file (an in-memory image, e.g. Fashion-MNIST); the page shows a placeholder"
        )
    path = Path(stored).expanduser()
    if not path.is_absolute():
        root = Path(image_root or ".").resolve()
        path = (root / path).resolve()
        if not path.is_relative_to(root):
            raise NotFoundError(f"stored path {stored!r} leaves the image root {str(root)!r}; it is not served")
    if not path.is_file():
        raise NotFoundError(
            f"image file {str(path)!r} is not there (moved or deleted since it was loaded); re-sync the collection"
            + ("" if image_root else ", or pass --image-root for relative paths")
        )
    return path


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback address (``127.0.0.0/8``, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback ``host`` unless ``allow_remote``.

    Raises:
        DeepfeatError: the host is not loopback and ``allow_remote`` is False.
    """
    if allow_remote or is_loopback(host):
        return
    raise DeepfeatError(
        f"refusing to serve on {host!r}: the search page has no login and shows the collection's images to "
        f"anyone who can reach the port. Use --host {DEFAULT_HOST} (the default) and an SSH tunnel, or pass "
        f"--allow-remote if every machine on that network may see them"
    )


def allowed_hosts_for(host: str, allow_remote: bool) -> list[str] | None:
    """Host-header names the server answers to; ``None`` (any) with ``allow_remote``."""
    if allow_remote:
        return None
    names = list(LOOPBACK_NAMES)
    bare = host.strip("[]")
    extra = f"[{bare}]" if ":" in bare else bare.lower()
    if extra not in names:
        names.append(extra)
    return names


# --------------------------------------------------------------------------------------------------
# the server state: connectors, bundles, panels (no HTTP here)


class _LRU:
    """A small thread-safe LRU mapping."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            if key not in self._data:
                return None
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)


def _connector_key(uri: str) -> str:
    from deepfeat.connectors.client import is_local_uri

    return str(Path(uri).expanduser().resolve()) if is_local_uri(uri) else uri


class Panel:
    """One opened panel: its connector (shared), collection spec and loaded bundle."""

    def __init__(self, index: int, config: PanelConfig, conn: "MilvusConnector", bundle: "ModelBundle") -> None:
        from deepfeat.connectors.collection import open_collection

        self.index = index
        self.config = config
        self.conn = conn
        self.bundle = bundle
        # the bundle must be the one that filled the collection: checked once, here
        self.spec = open_collection(conn, config.collection, bundle=bundle, what="serving")
        conn.ensure_loaded(self.spec.name)
        self.rows = conn.count(self.spec.name)
        self.output_fields = [f for f in self.spec.field_names if f not in HIDDEN_FIELDS]
        self._paths = _LRU(100_000)
        self.suggestions = self._suggestions()

    @property
    def has_path(self) -> bool:
        """Whether the collection stores image paths at all."""
        return "path" in self.spec.field_names

    def _query(self, *, filter: str = "", fields: Sequence[str], limit: int, offset: int = 0) -> list[dict[str, Any]]:
        from deepfeat.connectors.schema import PK_FIELD

        rows = self.conn.call(
            "query",
            self.conn.client.query,
            self.spec.name,
            filter=filter,
            output_fields=[PK_FIELD, *fields],
            limit=limit,
            offset=offset,
        )
        return [dict(r) for r in rows]

    def _suggestions(self) -> dict[str, list[Any] | None]:
        """Distinct values of the text/boolean fields in the first rows (None: too many to list)."""
        fields = [f.name for f in self.spec.fields if f.dtype in ("VARCHAR", "BOOL") and f.name in self.output_fields]
        fields = [f for f in fields if f not in ("record_id", "path")]
        if not fields or not self.rows:
            return {}
        rows = self._query(fields=fields, limit=min(self.rows, SUGGESTION_ROWS))
        out: dict[str, list[Any] | None] = {}
        for name in fields:
            values = {r.get(name) for r in rows if r.get(name) not in (None, "")}
            out[name] = sorted(values, key=str) if len(values) <= MAX_SUGGESTIONS else None
        return out

    def image_url(self, pk: str, path: Any) -> str | None:
        """The page's URL of a hit's thumbnail, or None when the record has no image file."""
        if not path:
            return None
        self._paths.put(pk, str(path))
        return f"/api/image/{self.index}/{pk}"

    def hits_json(self, hits: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Hits as the page shows them: rank, score, fields, and an image URL."""
        out = []
        for h in hits:
            row = {k: v for k, v in h.items() if k not in HIDDEN_FIELDS}
            row["pk"] = str(h["pk"])
            row["image"] = self.image_url(row["pk"], h.get("path"))
            out.append(row)
        return out

    def info(self) -> dict[str, Any]:
        """The panel as ``/api/info`` describes it."""
        card = self.bundle.card
        fields = [
            {"name": f.name, "dtype": f.dtype, "values": self.suggestions.get(f.name)}
            for f in self.spec.fields
            if f.name in self.output_fields and f.name != "path"
        ]
        return {
            "index": self.index,
            "label": self.config.label,
            "uri": self.conn.display_uri,
            "collection": self.spec.name,
            "requested_collection": self.config.collection,
            "rows": self.rows,
            "metric": self.spec.metric,
            "higher_is_closer": self.spec.metric != "L2",
            "dim": self.spec.dim,
            "bundle_id": card.bundle_id,
            "bundle_name": card.name,
            "backbone": card.backbone,
            "fields": fields,
            "group_by": [f.name for f in self.spec.fields if f.dtype in _GROUPABLE and f.name in self.output_fields],
        }

    def record(self, record_id: str) -> dict[str, Any]:
        """One record's fields, looked up by record id.

        Raises:
            NotFoundError: no such record id in this collection.
        """
        from deepfeat.connectors.schema import RECORD_ID_FIELD

        rows = self._query(filter=f"{RECORD_ID_FIELD} == {quote_string(record_id)}", fields=self.output_fields, limit=1)
        if not rows:
            raise NotFoundError(
                f"record id {record_id!r} is not in collection {self.spec.name!r}; pick one of the examples "
                f"or upload an image"
            )
        return rows[0]

    def image_path(self, pk: str) -> Path:
        """The image file of the record with primary key ``pk`` (only paths stored in the collection).

        Raises:
            NotFoundError: no such key, no path stored for it, or the file is gone or outside the root.
        """
        stored = self._paths.get(pk)
        if stored is None:
            if not self.has_path:
                raise NotFoundError(f"collection {self.spec.name!r} stores no image paths")
            got = self.conn.call("get", self.conn.client.get, self.spec.name, ids=[pk], output_fields=["path"])
            if not got:
                raise NotFoundError(f"no record with key {pk} in collection {self.spec.name!r}")
            stored = str(got[0].get("path") or "")
            if stored:
                self._paths.put(pk, stored)
        return resolve_image_path(stored, self.config.image_root)

    def examples(self, n: int, rng: random.Random) -> list[dict[str, Any]]:
        """``n`` random records (from one window of the collection) to query with."""
        from deepfeat.connectors.schema import RECORD_ID_FIELD

        if not self.rows:
            return []
        window = min(self.rows, _MAX_QUERY_WINDOW)
        pool = min(window, max(EXAMPLE_POOL, n))
        offset = rng.randrange(0, window - pool + 1)
        fields = [f for f in (RECORD_ID_FIELD, "label", "path") if f in self.spec.field_names]
        rows = self._query(fields=fields, limit=pool, offset=offset)
        picked = rng.sample(rows, min(n, len(rows)))
        return [
            {
                "id": str(r.get(RECORD_ID_FIELD)),
                "label": r.get("label"),
                "pk": str(r["pk"]),
                "image": self.image_url(str(r["pk"]), r.get("path")),
            }
            for r in picked
        ]


def _encode_png(pixels: "np.ndarray", size: int) -> bytes:
    from PIL import Image

    image = Image.fromarray(pixels)
    if max(image.size) > size:
        image.thumbnail((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _close_all(opened: Mapping[str, "MilvusConnector"], started: Sequence[str]) -> None:
    """Close what was opened; stop only the Milvus Lite servers started here (another client in this
    process may still be using a server it found running)."""
    for key, conn in opened.items():
        if key in started:
            conn.release_lite()
        else:
            conn.close()


class ServeState:
    """Everything the app serves from: panels over shared connectors, and the limits.

    Use :meth:`open`; call :meth:`close` when done (the app's lifespan does).
    """

    def __init__(
        self,
        panels: list[Panel],
        connectors: dict[str, "MilvusConnector"],
        *,
        max_upload_bytes: int,
        max_pixels: int,
        opened: Mapping[str, "MilvusConnector"],
        started: Sequence[str],
    ) -> None:
        self.panels = panels
        self.connectors = connectors
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = max_pixels
        self._opened = dict(opened)
        self._started = list(started)
        # one forward pass at a time: two concurrent CPU passes only slow each other down
        self._embed_lock = threading.Lock()
        self._thumbs = _LRU(2048)

    @classmethod
    def open(
        cls,
        configs: Sequence[PanelConfig],
        *,
        max_upload_bytes: int = MAX_UPLOAD_BYTES,
        max_pixels: int | None = None,
        connectors: Mapping[str, "MilvusConnector"] | None = None,
    ) -> "ServeState":
        """Open the connectors (one per distinct URI), load the bundles, check them against the collections.

        Args:
            configs: one panel, or two to compare side by side.
            connectors: already open connectors by URI to use instead of opening new ones (they are
                then not closed by :meth:`close`).

        Raises:
            DataError: no panel, or more than two.
            ConnectorError: Milvus unreachable, the ``.db`` locked by another process, no such collection.
            MismatchError: a bundle is not the one that filled its collection.
        """
        from deepfeat.connectors.client import _lite_served_here, connect
        from deepfeat.finetune.data.images import DEFAULT_MAX_PIXELS
        from deepfeat.finetune.models.bundle import ModelBundle

        if not 1 <= len(configs) <= 2:
            raise DataError(f"serve shows one panel, or two side by side; got {len(configs)}")
        given = {_connector_key(k): v for k, v in (connectors or {}).items()}
        opened: dict[str, MilvusConnector] = {}
        started: list[str] = []  # Milvus Lite paths whose server this state started (and stops)
        bundles: dict[str, ModelBundle] = {}
        panels: list[Panel] = []
        try:
            for i, cfg in enumerate(configs):
                key = _connector_key(cfg.uri)
                conn = given.get(key) or opened.get(key)
                if conn is None:
                    conn = opened[key] = connect(cfg.uri)
                    if conn.is_lite and not _lite_served_here(Path(key)):
                        started.append(key)
                    _ = conn.client  # open now: a held lock or a dead server is reported at start
                bkey = str(Path(cfg.bundle).expanduser().resolve())
                if bkey not in bundles:
                    bundles[bkey] = ModelBundle.load(cfg.bundle)
                panels.append(Panel(i, cfg, conn, bundles[bkey]))
                log.info(
                    "panel %d: %s (%s rows) with %s",
                    i,
                    panels[-1].spec.name,
                    panels[-1].rows,
                    bundles[bkey].card.bundle_id,
                )
        except BaseException:
            _close_all(opened, started)
            raise
        return cls(
            panels,
            {**given, **opened},
            max_upload_bytes=max_upload_bytes,
            max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels,
            opened=opened,
            started=started,
        )

    def close(self) -> None:
        """Close the connectors this state opened, and stop the Milvus Lite servers it started (their lock)."""
        _close_all(self._opened, self._started)
        self._opened, self._started = {}, []

    # ----------------------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Panels, the fields every panel has (for filters and group-by), and the limits."""
        shared = None
        for p in self.panels:
            names = {(f["name"], f["dtype"]) for f in p.info()["fields"]}
            shared = names if shared is None else shared & names
        first = self.panels[0].info()
        return {
            "panels": [p.info() for p in self.panels],
            "fields": [f for f in first["fields"] if (f["name"], f["dtype"]) in (shared or set())],
            "group_by": [g for g in first["group_by"] if all(g in p.info()["group_by"] for p in self.panels)],
            "operators": list(OPS),
            "max_top_k": MAX_TOP_K,
            "max_upload_bytes": self.max_upload_bytes,
        }

    def examples(self, n: int, seed: int | None = None) -> list[dict[str, Any]]:
        """``n`` random records of the first panel's collection, to query with."""
        return self.panels[0].examples(n, random.Random(seed))

    def _filters(self, req: SearchRequest) -> list[str | None]:
        exprs = []
        for p in self.panels:
            _check_group_by(p.spec, req.group_by)
            exprs.append(build_filter(p.spec, req.filters))
        return exprs

    def _search_kwargs(self, panel: Panel, req: SearchRequest, expr: str | None) -> dict[str, Any]:
        return {
            "top_k": req.top_k,
            "filter": expr,
            "group_by": req.group_by,
            "group_size": req.group_size,
            "output_fields": panel.output_fields,
        }

    def _panel_result(self, panel: Panel, run: Any, expr: str | None) -> dict[str, Any]:
        start = time.perf_counter()
        result: dict[str, Any] = {"index": panel.index, "label": panel.config.label, "filter": expr}
        try:
            result["hits"] = panel.hits_json(run())
            result["error"] = None
        except DeepfeatError as exc:
            result["hits"] = []
            result["error"] = str(exc)
        result["ms"] = round(1000 * (time.perf_counter() - start), 1)
        return result

    def decode_upload(self, data: bytes, filename: str) -> "np.ndarray":
        """Pixels of an uploaded file.

        Raises:
            PayloadTooLargeError: more than ``max_upload_bytes``.
            ImageDecodeError: empty, not an image, corrupt, or more than ``max_pixels`` pixels.
        """
        from deepfeat.finetune.data.images import load_image
        from deepfeat.finetune.errors import ImageDecodeError

        if len(data) > self.max_upload_bytes:
            raise PayloadTooLargeError(
                f"{filename!r} is {len(data):,} bytes; the limit is {self.max_upload_bytes / 2**20:g} MB "
                f"({self.max_upload_bytes:,} bytes). Upload a smaller image (the model sees it at a few hundred "
                f"pixels anyway)"
            )
        if not data:
            raise ImageDecodeError(filename, "the file is empty (0 bytes); pick an image file")
        try:
            return load_image(data, max_pixels=self.max_pixels)
        except ImageDecodeError as exc:
            raise ImageDecodeError(
                filename, f"{exc.reason}. Upload a JPEG, PNG, WebP, GIF, BMP, TIFF or DICOM image"
            ) from exc

    def search_upload(self, data: bytes, filename: str, req: SearchRequest) -> dict[str, Any]:
        """Search every panel with an uploaded image (each embedded by its panel's bundle)."""
        from deepfeat.connectors.search import search_vectors

        if req.record_id is not None:
            raise DataError("send either an image file or an id, not both")
        exprs = self._filters(req)
        pixels = self.decode_upload(data, filename)
        vectors: dict[int, np.ndarray] = {}
        panels = []
        for panel, expr in zip(self.panels, exprs, strict=True):
            key = id(panel.bundle)
            if key not in vectors:
                with self._embed_lock:
                    vectors[key] = panel.bundle.embed([pixels])

            def run(panel: Panel = panel, expr: str | None = expr, vec: "np.ndarray" = vectors[key]) -> Any:
                return search_vectors(panel.conn, panel.spec.name, vec, **self._search_kwargs(panel, req, expr))[0]

            panels.append(self._panel_result(panel, run, expr))
        thumb = base64.b64encode(_encode_png(pixels, THUMBNAIL_SIZE)).decode("ascii")
        h, w = pixels.shape[:2]
        query = {
            "kind": "upload",
            "name": filename,
            "label": None,
            "size": [w, h],
            "image": f"data:image/png;base64,{thumb}",
        }
        return {"query": query, "panels": panels}

    def search_record(self, req: SearchRequest) -> dict[str, Any]:
        """Search every panel with the stored vector of a record ("more like this")."""
        from deepfeat.connectors.search import search_ids

        if req.record_id is None:
            raise DataError("send an image file (multipart field 'image') or a JSON body with an 'id'")
        record_id = req.record_id
        exprs = self._filters(req)
        first = self.panels[0]
        row = first.record(record_id)
        query = {
            "kind": "id",
            "name": record_id,
            "label": row.get("label"),
            "image": first.image_url(str(row["pk"]), row.get("path")),
        }
        panels = []
        for panel, expr in zip(self.panels, exprs, strict=True):

            def run(panel: Panel = panel, expr: str | None = expr) -> Any:
                kwargs = self._search_kwargs(panel, req, expr)
                return search_ids(
                    panel.conn, panel.spec.name, [record_id], exclude_self=not req.include_self, **kwargs
                )[0]

            panels.append(self._panel_result(panel, run, expr))
        return {"query": query, "panels": panels}

    def thumbnail(self, panel_index: int, pk: str, size: int = THUMBNAIL_SIZE) -> bytes:
        """A PNG (at most ``size`` px a side) of the image stored for key ``pk``.

        Raises:
            NotFoundError: no such panel or key, no image file, or a file that no longer decodes.
            DataError: ``pk`` is not a deepfeat key (32 hex digits).
        """
        from deepfeat.finetune.data.images import load_image
        from deepfeat.finetune.errors import ImageDecodeError

        if not 0 <= panel_index < len(self.panels):
            raise NotFoundError(f"no panel {panel_index}; this page has {len(self.panels)}")
        if not _PK.match(pk):
            raise DataError(f"{pk!r} is not a record key (32 hex digits)")
        cached = self._thumbs.get((panel_index, pk, size))
        if cached is not None:
            return cast(bytes, cached)
        path = self.panels[panel_index].image_path(pk)
        try:
            pixels = load_image(path, max_pixels=self.max_pixels)
        except ImageDecodeError as exc:
            raise NotFoundError(f"the stored image of key {pk} cannot be shown: {exc}") from exc
        png = _encode_png(pixels, size)
        self._thumbs.put((panel_index, pk, size), png)
        return png


# --------------------------------------------------------------------------------------------------
# the web app


class _BodyLimit:
    """Refuse request bodies above ``limit`` bytes with 413, before anything parses them.

    The declared ``Content-Length`` is checked first; a body without one (chunked) is counted as it
    arrives.
    """

    class _Exceeded(Exception):
        pass

    def __init__(self, app: "ASGIApp", limit: int, file_limit: int) -> None:
        self.app = app
        self.limit = limit
        self.file_limit = file_limit  # what the message names: the body limit adds the form's overhead

    async def _refuse(self, send: "Send") -> None:
        body = json.dumps(
            {"detail": f"the upload is larger than the limit of {self.file_limit / 2**20:g} MB; upload a smaller image"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: "Scope", receive: "Receive", send: "Send") -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        seen = 0
        started = False

        async def counted() -> "Message":
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._Exceeded
            return message

        async def tracked(message: "Message") -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except self._Exceeded:
            if not started:
                await self._refuse(send)


class _SecurityHeaders:
    """Headers that keep the page self-contained: no outside scripts, no framing, no sniffing."""

    CSP = (
        "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    )

    def __init__(self, app: "ASGIApp") -> None:
        self.app = app

    async def __call__(self, scope: "Scope", receive: "Receive", send: "Send") -> None:
        async def with_headers(message: "Message") -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                headers += [
                    (b"content-security-policy", self.CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers if scope["type"] == "http" else send)


def _status_of(exc: DeepfeatError) -> int:
    from deepfeat.finetune.errors import ConnectorError, MismatchError

    if isinstance(exc, PayloadTooLargeError):
        return 413
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, MismatchError):
        return 409
    if isinstance(exc, ConnectorError):
        return 503
    return 400


def create_app(
    panels: Sequence[PanelConfig],
    *,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int | None = None,
    allowed_hosts: Sequence[str] | None = LOOPBACK_NAMES,
    connectors: Mapping[str, "MilvusConnector"] | None = None,
) -> "FastAPI":
    """The FastAPI app of ``deepfeat serve`` over one panel, or two side by side.

    Connectors and bundles are opened here, so a locked ``.db``, a missing collection or a bundle that
    did not fill it is reported before the server starts; they are closed when the app shuts down.

    Args:
        panels: one :class:`PanelConfig`, or two to compare.
        max_upload_bytes: largest accepted upload (413 above).
        max_pixels: largest accepted image in pixels (default: ``load_image``'s decompression-bomb limit).
        allowed_hosts: ``Host`` header names answered (default: loopback names); ``None`` for any.
        connectors: open connectors by URI to share (not closed by the app), e.g. in tests.

    Endpoints: ``GET /`` (the page), ``GET /api/info``, ``GET /api/examples?n=``, ``POST /api/search``
    (multipart: ``image`` file and ``params`` JSON; or a JSON body with ``id``), ``GET
    /api/image/{panel}/{pk}?size=``.

    Raises:
        MissingExtraError: FastAPI is not installed.
    """
    try:
        from fastapi import FastAPI, Query, Request
        from fastapi.responses import FileResponse, JSONResponse, Response
        from fastapi.staticfiles import StaticFiles
        from starlette.concurrency import run_in_threadpool
        from starlette.datastructures import UploadFile
        from starlette.middleware.trustedhost import TrustedHostMiddleware
    except ImportError as exc:
        raise MissingExtraError("fastapi", "serve", "deepfeat serve") from exc

    state = ServeState.open(panels, max_upload_bytes=max_upload_bytes, max_pixels=max_pixels, connectors=connectors)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            state.close()

    app = FastAPI(
        title="deepfeat serve",
        summary="Search a deepfeat collection by image, and compare two",
        docs_url=None,  # the interactive docs load their scripts from a CDN
        redoc_url=None,
        openapi_url="/api/openapi.json",
        lifespan=lifespan,
    )
    app.state.deepfeat = state
    # multipart framing, the params field and the file name come on top of the image bytes
    app.add_middleware(_BodyLimit, limit=max_upload_bytes + 256 * 1024, file_limit=max_upload_bytes)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    app.add_middleware(_SecurityHeaders)

    @app.exception_handler(DeepfeatError)
    async def deepfeat_error(request: Request, exc: DeepfeatError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=_status_of(exc))

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"cache-control": "no-cache"})

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        return state.info()

    @app.get("/api/examples")
    async def examples(n: int = Query(8, ge=1, le=48), seed: int | None = None) -> list[dict[str, Any]]:
        return await run_in_threadpool(state.examples, n, seed)

    @app.post("/api/search")
    async def search(request: Request) -> dict[str, Any]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            async with request.form(max_files=1, max_fields=4) as form:
                upload = form.get("image")
                if not isinstance(upload, UploadFile):
                    raise DataError("the form has no file in its 'image' field; choose an image to upload")
                params = _json_param(form.get("params"))
                req = parse_search_request(params)
                filename = Path(upload.filename or "upload").name
                data = await upload.read(state.max_upload_bytes + 1)
            return await run_in_threadpool(state.search_upload, data, filename, req)
        if kind == "application/json":
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(f"the request body is not valid JSON ({exc})") from None
            return await run_in_threadpool(state.search_record, parse_search_request(body))
        raise DataError(
            f"send the query as multipart/form-data (an 'image' file) or application/json ({{\"id\": ...}}), "
            f"not {kind or 'no content type'!r}"
        )

    @app.get("/api/image/{panel}/{pk}")
    def image(panel: int, pk: str, size: int = Query(THUMBNAIL_SIZE, ge=16, le=1024)) -> Response:
        png = state.thumbnail(panel, pk, size)
        return Response(png, media_type="image/png", headers={"cache-control": "private, max-age=300"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _json_param(value: Any) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if not isinstance(value, str):
        raise DataError("the 'params' form field must be JSON text, not a file")
    try:
        data = json.loads(value)
    except json.JSONDecodeError as exc:
        raise DataError(f"the 'params' form field is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"the 'params' form field must be a JSON object, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------------------
# the command


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as exc:
            raise DeepfeatError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port, or stop "
                f"what is using it"
            ) from exc


def panels_from_args(args: argparse.Namespace) -> list[PanelConfig]:
    """The panels the ``serve`` options describe.

    Raises:
        DataError: compare options given without both ``--compare-collection`` and ``--compare-bundle``.
    """
    from deepfeat.connectors.client import DEFAULT_URI, URI_ENV_VAR

    uri = args.uri or os.environ.get(URI_ENV_VAR) or DEFAULT_URI
    panels = [PanelConfig(args.label or args.collection, uri, args.collection, args.bundle, args.image_root)]
    compare = [
        args.compare_uri,
        args.compare_collection,
        args.compare_bundle,
        args.compare_label,
        args.compare_image_root,
    ]
    if any(v is not None for v in compare):
        if not (args.compare_collection and args.compare_bundle):
            raise DataError(
                "comparing needs both --compare-collection and --compare-bundle (and --compare-uri when the "
                "second collection is in another database)"
            )
        label = args.compare_label or args.compare_collection
        if label == panels[0].label:
            label = f"{label} (2)"
        panels.append(
            PanelConfig(
                label,
                args.compare_uri or uri,
                args.compare_collection,
                args.compare_bundle,
                args.compare_image_root or args.image_root,
            )
        )
    return panels


def _cmd_serve(args: argparse.Namespace) -> int:
    check_host(args.host, args.allow_remote)
    if not 0 < args.port < 65536:
        raise DataError(f"--port must be from 1 to 65535, got {args.port}")
    if args.max_upload_mb <= 0:
        raise DataError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    try:
        import uvicorn
    except ImportError as exc:
        raise MissingExtraError("uvicorn", "serve", "deepfeat serve") from exc
    panels = panels_from_args(args)
    _check_port(args.host, args.port)
    app = create_app(
        panels,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        allowed_hosts=allowed_hosts_for(args.host, args.allow_remote),
    )
    state: ServeState = app.state.deepfeat
    shown = f"[{args.host.strip('[]')}]" if ":" in args.host.strip("[]") else args.host
    for p in state.panels:
        print(
            f"  {p.config.label}: collection {p.spec.name!r} ({p.rows} rows) at {p.conn.display_uri}, "
            f"bundle {p.bundle.card.bundle_id}"
        )
    print(f"deepfeat serve: http://{shown}:{args.port}/  (Ctrl+C to stop)", flush=True)
    verbose = int(getattr(args, "verbose", 0) or 0)
    uvicorn.run(
        app,
        host=args.host.strip("[]"),
        port=args.port,
        log_level="info" if verbose else "warning",
        access_log=verbose > 0,
    )
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``deepfeat serve``."""
    p = sub.add_parser(
        "serve",
        help="a local web page: search a collection by image, filter, group, compare two collections",
        description="Start a local web page over a collection and its model bundle: drop or pick a query "
        "image and see the top-k hits with scores and metadata; filter by metadata, group by a field, and "
        "compare a second collection (e.g. off-the-shelf vs fine-tuned) side by side. Listens on "
        f'{DEFAULT_HOST} only unless --allow-remote. Needs: pip install "deepfeat[serve]". A server\'s '
        "token comes from $DEEPFEAT_MILVUS_TOKEN or $MILVUS_TOKEN.",
    )
    p.add_argument(
        "--uri",
        default=None,
        help="Milvus Lite .db path or http(s)://host:19530 (default: $DEEPFEAT_MILVUS_URI or deepfeat.db)",
    )
    p.add_argument("--collection", "-c", required=True, help="collection (or alias) to search")
    p.add_argument("--bundle", required=True, help="the model bundle that filled the collection")
    p.add_argument("--label", default=None, help="panel title (default: the collection name)")
    p.add_argument(
        "--image-root",
        default=None,
        help="folder that relative image paths are relative to (images are served from inside it only)",
    )
    g = p.add_argument_group("compare: a second panel beside the first")
    g.add_argument("--compare-uri", default=None, help="database of the second collection (default: --uri)")
    g.add_argument("--compare-collection", default=None, help="second collection")
    g.add_argument("--compare-bundle", default=None, help="the bundle that filled the second collection")
    g.add_argument("--compare-label", default=None, help="second panel title (default: its collection name)")
    g.add_argument(
        "--compare-image-root", default=None, help="image root of the second collection (default: --image-root)"
    )
    s = p.add_argument_group("server")
    s.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on (default {DEFAULT_HOST}; anything but loopback needs --allow-remote)",
    )
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    s.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback --host: anyone who "
        "reaches the port sees the collection's images (there is no login)",
    )
    s.add_argument(
        "--max-upload-mb",
        type=float,
        default=MAX_UPLOAD_BYTES / 2**20,
        help=f"largest query upload in MB (default {MAX_UPLOAD_BYTES // 2**20})",
    )
    p.set_defaults(handler=_cmd_serve)


__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "MAX_UPLOAD_BYTES",
    "Condition",
    "NotFoundError",
    "PanelConfig",
    "PayloadTooLargeError",
    "SearchRequest",
    "ServeState",
    "add_cli",
    "build_filter",
    "check_host",
    "create_app",
    "is_loopback",
    "parse_search_request",
    "quote_string",
    "resolve_image_path",
]
