"""What the search page serves from: panels over shared connectors and loaded bundles (no HTTP here).

Milvus Lite lets one process open a ``.db``: :class:`ServeState` opens one connector per distinct URI
and the panels share it, so both collections of a comparison may live in the same ``.db``.

A hit's picture comes from its image file (``path``), or, for a record read from a Hugging Face
``save_to_disk`` folder (no file), from that folder's row (``hf_dataset``, ``hf_row``, ``hf_column``),
decoded and re-encoded as PNG by the same route; both only from inside the panel's image root.
"""

from __future__ import annotations

import base64
import io
import logging
import random
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from PIL import Image

from deepfeat.connectors.client import MilvusConnector, connect, is_local_uri, lite_served_here
from deepfeat.connectors.collection import open_collection
from deepfeat.connectors.fields import RECORD_ID_FIELD
from deepfeat.connectors.query import MAX_LIMIT, build_filter, query_rows, search_ids, search_vectors
from deepfeat.finetune.data.images import DEFAULT_MAX_PIXELS, ImageSource, load_image
from deepfeat.finetune.data.readers import HF_DATASET_COLUMN, HF_IMAGE_COLUMN, HF_ROW_COLUMN, read_hf_image
from deepfeat.finetune.errors import DataError, DeepfeatError, ImageDecodeError
from deepfeat.finetune.models.bundle import ModelBundle

from .requests import (
    GROUPABLE,
    MAX_TOP_K,
    OPS,
    NotFoundError,
    PayloadTooLargeError,
    SearchRequest,
    check_group_by,
)
from .security import (
    MAX_UPLOAD_BYTES,
    image_root_of,
    locate_image,
    resolve_hf_dataset,
    resolve_image_path,
    shown_path,
)

log = logging.getLogger(__name__)

THUMBNAIL_SIZE = 256
#: Fields never offered in the page's filters and never sent back with a hit.
HIDDEN_FIELDS = frozenset({"content_hash", "model_version"})
#: Distinct values listed for a field in the page's filter suggestions (more: free text).
MAX_SUGGESTIONS = 50
SUGGESTION_ROWS = 2000
#: Rows sampled from for the "examples" strip (one query at a random offset).
EXAMPLE_POOL = 200
_PK = re.compile(r"^[0-9a-f]{32}$")
#: The fields that lead from a record of a ``save_to_disk`` folder back to its picture.
HF_FIELDS = (HF_DATASET_COLUMN, HF_ROW_COLUMN, HF_IMAGE_COLUMN)
#: Fields holding a location on the server's disk: shown relative to the image root only, never offered as filters.
LOCATION_FIELDS = frozenset({"path", HF_DATASET_COLUMN})


@dataclass(frozen=True)
class DatasetImage:
    """Where a record without an image file keeps its picture: a row of a ``save_to_disk`` folder (as stored)."""

    dataset: str
    row: int
    column: str = "image"

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> DatasetImage | None:
        """The dataset row a record names (its ``hf_*`` fields), or ``None`` when it names none (or not a row)."""
        dataset, index, column = (row.get(k) for k in HF_FIELDS)
        if not dataset or isinstance(index, bool) or not isinstance(index, int | np.integer) or index < 0:
            return None
        return cls(str(dataset), int(index), str(column) if column else "image")


#: A record's way to its picture: the stored ``path`` value, or a dataset row.
ImageRef = str | DatasetImage


def _stored_ref(row: Mapping[str, Any]) -> ImageRef | None:
    """The picture a row names: its ``path`` when set, else its dataset row, else ``None``."""
    path = row.get("path")
    if path:
        return str(path)
    return DatasetImage.of(row)


@dataclass(frozen=True)
class PanelConfig:
    """One side of the page: a collection and the model bundle that filled it.

    Args:
        label: the panel's title ("off-the-shelf", "fine-tuned").
        uri: a Milvus Lite ``.db`` path or ``http(s)://host:19530``.
        collection: collection or alias.
        bundle: the model bundle directory that filled the collection (checked at start).
        image_root: the folder images are served from (default: the working directory); relative
            ``path`` values are relative to it, and a path outside it (absolute, ``..`` or a symlink
            out) is not served.
    """

    label: str
    uri: str
    collection: str
    bundle: str | Path
    image_root: str | Path | None = None


class LRU:
    """A small thread-safe LRU mapping."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        """The value of ``key`` (now the most recent), or ``None``."""
        with self._lock:
            if key not in self._data:
                return None
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key: Any, value: Any) -> None:
        """Store ``value``, dropping the least recently used entries above ``size``."""
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)


def connector_key(uri: str) -> str:
    """One key per database: a Milvus Lite path resolved, a server URI as given."""
    return str(Path(uri).expanduser().resolve()) if is_local_uri(uri) else uri


class Panel:
    """One opened panel: its connector (shared), collection spec and loaded bundle."""

    def __init__(self, index: int, config: PanelConfig, conn: MilvusConnector, bundle: ModelBundle) -> None:
        self.index = index
        self.config = config
        self.conn = conn
        self.bundle = bundle
        self.image_root = image_root_of(config.image_root)
        # the bundle must be the one that filled the collection: checked once, here
        self.spec = open_collection(conn, config.collection, bundle=bundle, what="serving")
        conn.ensure_loaded(self.spec.name)
        self.rows = conn.count(self.spec.name)
        self.output_fields = [f for f in self.spec.field_names if f not in HIDDEN_FIELDS]
        #: the fields that lead to a picture: ``path`` and the Hugging Face way back, those the collection has
        self.image_fields = [f for f in ("path", *HF_FIELDS) if f in self.spec.field_names]
        self._refs = LRU(100_000)
        self.suggestions = self._suggestions()

    @property
    def has_path(self) -> bool:
        """Whether the collection stores image paths at all."""
        return "path" in self.spec.field_names

    @property
    def has_datasets(self) -> bool:
        """Whether the collection stores a way back to Hugging Face dataset rows (``hf_dataset``, ``hf_row``)."""
        return HF_DATASET_COLUMN in self.spec.field_names and HF_ROW_COLUMN in self.spec.field_names

    def _query(self, *, filter: str | None = None, fields: Sequence[str], limit: int, offset: int = 0
               ) -> list[dict[str, Any]]:
        return query_rows(self.conn, self.spec, fields, filter=filter, limit=limit, offset=offset)

    def _suggestions(self) -> dict[str, list[Any] | None]:
        """Distinct values of the text/boolean fields in the first rows (None: too many to list)."""
        fields = [f.name for f in self.spec.fields if f.dtype in ("VARCHAR", "BOOL") and f.name in self.output_fields]
        fields = [f for f in fields if f != "record_id" and f not in LOCATION_FIELDS]
        if not fields or not self.rows:
            return {}
        rows = self._query(fields=fields, limit=min(self.rows, SUGGESTION_ROWS))
        out: dict[str, list[Any] | None] = {}
        for name in fields:
            values = {r.get(name) for r in rows if r.get(name) not in (None, "")}
            out[name] = sorted(values, key=str) if len(values) <= MAX_SUGGESTIONS else None
        return out

    def image_url(self, pk: str, row: Mapping[str, Any]) -> str | None:
        """The page's URL of a hit's thumbnail, or None when the record (its fields ``row``) has neither an image
        file nor a Hugging Face dataset folder inside the root."""
        ref = _stored_ref(row)
        where = ref if isinstance(ref, str) else ref.dataset if ref is not None else ""
        if not where or locate_image(where, self.image_root) is None:
            return None
        self._refs.put(pk, ref)
        return f"/api/image/{self.index}/{pk}"

    def hits_json(self, hits: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Hits as the page shows them: rank, score, fields (paths relative to the root), and an image URL."""
        out = []
        for h in hits:
            row = {k: v for k, v in h.items() if k not in HIDDEN_FIELDS}
            row["pk"] = str(h["pk"])
            row["image"] = self.image_url(row["pk"], h)
            for name in LOCATION_FIELDS & set(row):  # never show where a file or dataset lies outside the root
                row[name] = shown_path(str(row[name] or ""), self.image_root)
            out.append(row)
        return out

    def info(self) -> dict[str, Any]:
        """The panel as ``/api/info`` describes it."""
        card = self.bundle.card
        fields = [
            {"name": f.name, "dtype": f.dtype, "values": self.suggestions.get(f.name)}
            for f in self.spec.fields
            if f.name in self.output_fields and f.name not in LOCATION_FIELDS
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
            "group_by": [f.name for f in self.spec.fields if f.dtype in GROUPABLE and f.name in self.output_fields],
        }

    def record(self, record_id: str) -> dict[str, Any]:
        """One record's fields, looked up by record id.

        Raises:
            NotFoundError: no such record id in this collection.
        """
        expr = build_filter(equals={RECORD_ID_FIELD: record_id}, spec=self.spec)
        rows = self._query(filter=expr, fields=self.output_fields, limit=1)
        if not rows:
            raise NotFoundError(
                f"record id {record_id!r} is not in collection {self.spec.name!r}; pick one of the examples "
                f"or upload an image"
            )
        return rows[0]

    def image_ref(self, pk: str) -> ImageRef:
        """The stored way to the picture of the record with primary key ``pk``: its path, or its dataset row.

        Raises:
            NotFoundError: no such key, or the collection stores neither paths nor dataset rows.
        """
        ref = self._refs.get(pk)
        if ref is not None:
            return cast(ImageRef, ref)
        if not self.has_path and not self.has_datasets:
            raise NotFoundError(f"collection {self.spec.name!r} stores no image paths")
        got = self._query(filter=build_filter(equals={self.spec.pk_field: pk}, spec=self.spec),
                          fields=self.image_fields, limit=1)
        if not got:
            raise NotFoundError(f"no record with key {pk} in collection {self.spec.name!r}")
        found = _stored_ref(got[0])
        if found is None:
            return ""  # resolve_image_path says: no image file
        self._refs.put(pk, found)
        return found

    def image_path(self, pk: str) -> Path:
        """The image file of the record with primary key ``pk`` (only paths stored in the collection).

        Raises:
            NotFoundError: no such key, no path stored for it, or the file is gone or outside the root.
        """
        ref = self.image_ref(pk)
        return resolve_image_path(ref if isinstance(ref, str) else "", self.image_root)

    def image_source(self, pk: str) -> Path | ImageSource:
        """What :func:`load_image` decodes for the record with primary key ``pk``: its image file inside the root, or,
        for a record of a Hugging Face ``save_to_disk`` folder inside the root, that row's image (encoded bytes or
        an array; a file the dataset only references must lie inside the root too).

        Raises:
            NotFoundError: no such key, nothing stored for it, a file or folder gone or outside the root, or a row
                the dataset does not hold (the reason goes to the server's log, not to the page).
        """
        ref = self.image_ref(pk)
        if isinstance(ref, str):
            return resolve_image_path(ref, self.image_root)
        folder = resolve_hf_dataset(ref.dataset, self.image_root)
        try:
            found = read_hf_image(folder, ref.row, ref.column)
        except DataError as exc:
            log.warning("panel %d, key %s: %s", self.index, pk, exc)
            raise NotFoundError(
                f"the image of key {pk} is not in its Hugging Face dataset folder any more (the server's log names "
                f"the reason); the dataset changed since it was loaded: re-load the collection"
            ) from None
        # a dataset that only references files: the referenced file obeys the image root like any stored path
        return resolve_image_path(found, self.image_root) if isinstance(found, str) else found

    def examples(self, n: int, rng: random.Random) -> list[dict[str, Any]]:
        """``n`` random records (from one window of the collection) to query with."""
        if not self.rows:
            return []
        window = min(self.rows, MAX_LIMIT)
        pool = min(window, max(EXAMPLE_POOL, n))
        offset = rng.randrange(0, window - pool + 1)
        fields = [f for f in (RECORD_ID_FIELD, "label", *self.image_fields) if f in self.spec.field_names]
        rows = self._query(fields=fields, limit=pool, offset=offset)
        picked = rng.sample(rows, min(n, len(rows)))
        return [
            {
                "id": str(r.get(RECORD_ID_FIELD)),
                "label": r.get("label"),
                "pk": str(r["pk"]),
                "image": self.image_url(str(r["pk"]), r),
            }
            for r in picked
        ]


def encode_png(pixels: np.ndarray, size: int) -> bytes:
    """``pixels`` as PNG bytes, shrunk to at most ``size`` px a side."""
    image = Image.fromarray(pixels)
    if max(image.size) > size:
        image.thumbnail((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _close_all(opened: Mapping[str, MilvusConnector], started: Sequence[str]) -> None:
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
        connectors: dict[str, MilvusConnector],
        *,
        max_upload_bytes: int,
        max_pixels: int,
        opened: Mapping[str, MilvusConnector],
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
        self._thumbs = LRU(2048)

    @classmethod
    def open(
        cls,
        configs: Sequence[PanelConfig],
        *,
        max_upload_bytes: int = MAX_UPLOAD_BYTES,
        max_pixels: int | None = None,
        connectors: Mapping[str, MilvusConnector] | None = None,
    ) -> ServeState:
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
        if not 1 <= len(configs) <= 2:
            raise DataError(f"serve shows one panel, or two side by side; got {len(configs)}")
        given = {connector_key(k): v for k, v in (connectors or {}).items()}
        opened: dict[str, MilvusConnector] = {}
        started: list[str] = []  # Milvus Lite paths whose server this state started (and stops)
        bundles: dict[str, ModelBundle] = {}
        panels: list[Panel] = []
        try:
            for i, cfg in enumerate(configs):
                key = connector_key(cfg.uri)
                conn = given.get(key) or opened.get(key)
                if conn is None:
                    conn = opened[key] = connect(cfg.uri)
                    if conn.is_lite and not lite_served_here(Path(key)):
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
            check_group_by(p.spec, req.group_by)
            exprs.append(build_filter(conditions=req.filters, spec=p.spec))
        return exprs

    def _search_kwargs(self, panel: Panel, req: SearchRequest, expr: str | None) -> dict[str, Any]:
        return {
            "top_k": req.top_k,
            "filter": expr,
            "group_by": req.group_by,
            "group_size": req.group_size,
            "output_fields": panel.output_fields,
        }

    def _panel_result(self, panel: Panel, run: Callable[[], Any], expr: str | None) -> dict[str, Any]:
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

    def decode_upload(self, data: bytes, filename: str) -> np.ndarray:
        """Pixels of an uploaded file.

        Raises:
            PayloadTooLargeError: more than ``max_upload_bytes``.
            ImageDecodeError: empty, not an image, corrupt, or more than ``max_pixels`` pixels.
        """
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

            def run(panel: Panel = panel, expr: str | None = expr, vec: np.ndarray = vectors[key]) -> Any:
                return search_vectors(panel.conn, panel.spec.name, vec, **self._search_kwargs(panel, req, expr))[0]

            panels.append(self._panel_result(panel, run, expr))
        thumb = base64.b64encode(encode_png(pixels, THUMBNAIL_SIZE)).decode("ascii")
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
            "image": first.image_url(str(row["pk"]), row),
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

        A file that does not decode is reported without its reason: the decoder's message may quote
        the file's first bytes, so the reason goes to the server's log only.

        Raises:
            NotFoundError: no such panel or key, no image file (or Hugging Face dataset folder) inside the root, or
                an image that does not decode.
            DataError: ``pk`` is not a deepfeat key (32 hex digits).
        """
        if not 0 <= panel_index < len(self.panels):
            raise NotFoundError(f"no panel {panel_index}; this page has {len(self.panels)}")
        if not _PK.match(pk):
            raise DataError(f"{pk!r} is not a record key (32 hex digits)")
        cached = self._thumbs.get((panel_index, pk, size))
        if cached is not None:
            return cast(bytes, cached)
        panel = self.panels[panel_index]
        source = panel.image_source(pk)
        try:
            pixels = load_image(source, max_pixels=self.max_pixels)
        except ImageDecodeError as exc:
            log.warning("panel %d, key %s: %s", panel_index, pk, exc)
            raise NotFoundError(
                f"the stored image of key {pk} cannot be shown: it does not decode as an image (the server's log "
                f"names the reason); re-export it or re-sync the collection"
            ) from None
        png = encode_png(pixels, size)
        self._thumbs.put((panel_index, pk, size), png)
        return png
