"""Bulk-load embeddings into Milvus: idempotent, resumable upserts with a progress bar and a final check.

Rows are upserted by their stable key (see :func:`~deepfeat.connectors.fields.primary_key`), so a
re-run overwrites instead of duplicating. After every acknowledged batch (durable in Milvus' write-ahead
log, on Lite and on servers), a small JSON state file is replaced atomically; a run killed at any point
resumes from it, skipping what is already in. Batches are split below Milvus' 64 MB message limit.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from deepfeat.connectors.client import MilvusConnector
from deepfeat.connectors.collection import BundleLike, create_collection
from deepfeat.connectors.fields import PK_FIELD, RECORD_ID_FIELD, VECTOR_FIELD, KeyMode, primary_keys
from deepfeat.connectors.index import IndexSpec
from deepfeat.connectors.schema import CollectionSpec, fingerprint_of
from deepfeat.finetune.errors import ConnectorError, DataError, MismatchError
from deepfeat.finetune.inference.shards import check_ids, common_fingerprint, list_shards, read_schema
from deepfeat.finetune.models.bundle import check_compatible

log = logging.getLogger(__name__)

#: gRPC messages are limited to 64 MB; batches are split to stay under this estimate of their size.
DEFAULT_MAX_BATCH_BYTES = 48 << 20
DEFAULT_BATCH_ROWS = 2000
STATE_FORMAT = 1
FSYNC_SECONDS = 5.0


@dataclass
class LoadReport:
    """What a load did.

    Attributes:
        rows_written: rows upserted by this run.
        rows_resumed: rows found durably in from an earlier, interrupted run (not sent again).
        rows_total: rows in the source.
        expected_count: rows the collection must hold afterwards (``None`` when not checked by count).
        final_count: rows the collection holds afterwards.
        verified: the final check passed.
    """

    collection: str
    rows_written: int
    rows_resumed: int
    rows_total: int
    expected_count: int | None
    final_count: int
    verified: bool
    seconds: float
    state_path: Path | None
    write_seconds: float = 0.0

    @property
    def vectors_per_second(self) -> float:
        """Rows written per second while writing (reading, encoding and upserting)."""
        return self.rows_written / max(self.write_seconds or self.seconds, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        return {
            "collection": self.collection,
            "rows_written": self.rows_written,
            "rows_resumed": self.rows_resumed,
            "rows_total": self.rows_total,
            "expected_count": self.expected_count,
            "final_count": self.final_count,
            "verified": self.verified,
            "seconds": round(self.seconds, 3),
            "write_seconds": round(self.write_seconds, 3),
            "vectors_per_second": round(self.vectors_per_second, 1),
            "state_path": str(self.state_path) if self.state_path else None,
        }


class LoadState:
    """The resume state of one load: which shards (and how many batches of each) are durably in.

    A small JSON file, replaced atomically (write, fsync, rename) after every batch.
    """

    def __init__(self, path: Path | None, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data
        self._synced = time.monotonic()

    @classmethod
    def open(cls, path: Path | None, *, collection: str, bundle_id: str, batch_rows: int, resume: bool) -> LoadState:
        """Read the state at ``path`` (when resuming and it belongs to this load) or start a new one."""
        fresh = {
            "format": STATE_FORMAT,
            "collection": collection,
            "bundle_id": bundle_id,
            "batch_rows": batch_rows,
            "count_before": None,
            "rows_done": 0,
            "shards": {},
            "batches_done": 0,
            "complete": False,
        }
        if path is None or not path.exists() or not resume:
            return cls(path, fresh)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            # only a crash of the machine (not of the process) can leave a torn state: starting over
            # is safe, the upserts are idempotent
            log.warning("the load state %s is unreadable (%s): sending every row again", path, exc)
            return cls(path, fresh)
        if data.get("collection") != collection or data.get("bundle_id") != bundle_id:
            log.info(
                "state %s is for %s/%s, not %s/%s: starting a new load",
                path,
                data.get("collection"),
                data.get("bundle_id"),
                collection,
                bundle_id,
            )
            return cls(path, fresh)
        return cls(path, data)

    @property
    def batch_rows(self) -> int:
        """Rows per read batch (kept from the first run, so batch numbers stay meaningful)."""
        return int(self.data["batch_rows"])

    @property
    def rows_done(self) -> int:
        """Rows durably in, according to the state."""
        return int(self.data.get("rows_done", 0))

    def shard(self, name: str, size: int, rows: int) -> dict[str, Any]:
        """The entry of one shard, reset when the file changed since it was recorded."""
        shards: dict[str, Any] = self.data["shards"]
        entry = shards.get(name)
        if entry is None or entry.get("size") != size or entry.get("rows") != rows:
            if entry is not None:
                log.warning("shard %s changed since the interrupted run: loading it again", name)
                self.data["rows_done"] = self.rows_done - int(entry.get("rows_done", 0))
            entry = {"size": size, "rows": rows, "batches_done": 0, "rows_done": 0, "done": False}
            shards[name] = entry
        return dict(entry)

    def mark(self, name: str, batches_done: int, rows_added: int, *, done: bool = False) -> None:
        """Record one more batch of ``name`` as durably in, and save."""
        entry = self.data["shards"][name]
        entry["batches_done"] = batches_done
        entry["rows_done"] = int(entry["rows_done"]) + rows_added
        entry["done"] = done
        self.data["rows_done"] = self.rows_done + rows_added
        self.save()

    def mark_batch(self, rows_added: int) -> None:
        """Record one more batch of an iterator source, and save."""
        self.data["batches_done"] = int(self.data.get("batches_done", 0)) + 1
        self.data["rows_done"] = self.rows_done + rows_added
        self.save()

    def save(self, *, sync: bool = False) -> None:
        """Write the state atomically (no-op without a path).

        Write-then-rename survives a killed process at any instant. ``fsync`` (which also survives a
        machine crash) costs ~0.1 s on some disks, so it is done at most every ``FSYNC_SECONDS`` and when
        ``sync`` is asked for; a state that is behind only makes a resumed load send a few batches again.
        """
        if self.path is None:
            return
        self.data["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        now = time.monotonic()
        durable = sync or now - self._synced > FSYNC_SECONDS
        try:
            with open(tmp, "w") as f:
                json.dump(self.data, f, indent=1, sort_keys=True)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, self.path)
            if durable:
                self._synced = now
        except OSError as exc:
            raise ConnectorError(
                f"cannot write the load state {str(self.path)!r} ({exc.strerror or exc}); pass a "
                f"writable state path (--state)"
            ) from exc

    def resume_hint(self, total: int) -> str:
        """What is durably in and how to go on, for error messages."""
        where = f" (state file {str(self.path)!r})" if self.path else ""
        return (
            f"{self.rows_done} of {total} rows are durably in collection {self.data['collection']!r}{where}; "
            f"re-run the same command to resume from there"
        )


def batch_vectors(batch: pa.RecordBatch | pa.Table, dim: int, where: str) -> np.ndarray:
    """The ``vector`` column of a batch as float32 (n, dim) without copying where possible.

    Raises:
        DataError: no vector column, missing vectors, or rows of another length.
        MismatchError: vectors of another dim than the collection's.
    """
    if VECTOR_FIELD not in batch.schema.names:
        raise DataError(f"{where} has no 'vector' column (columns: {batch.schema.names})")
    col = batch.column(VECTOR_FIELD)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if col.null_count:
        raise DataError(f"{where}: {col.null_count} rows have no vector; re-embed them")
    if pa.types.is_fixed_size_list(col.type):
        width = col.type.list_size
    elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        lengths = pc_list_lengths(col)
        width = int(lengths[0]) if len(lengths) else dim
        if len(lengths) and (lengths != width).any():
            raise DataError(f"{where}: vectors of different lengths ({sorted(set(lengths.tolist()))[:5]})")
    else:
        raise DataError(f"{where}: column 'vector' is {col.type}, expected a list of float32")
    if width != dim:
        raise MismatchError(
            f"{where}: vectors have dim {width} but the collection holds dim {dim}; these embeddings "
            f"come from another model: use a new collection"
        )
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float32).reshape(len(batch), width)


def pc_list_lengths(col: pa.Array) -> np.ndarray:
    """Lengths of the lists of a list array."""
    import pyarrow.compute as pc

    return np.asarray(pc.list_value_length(col).to_numpy(zero_copy_only=False))


class BatchWriter:
    """Encodes and upserts batches of (rows, vectors), split below the message limit, with a progress bar."""

    def __init__(
        self,
        conn: MilvusConnector,
        spec: CollectionSpec,
        *,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        bar: Any = None,
    ) -> None:
        self.conn = conn
        self.spec = spec
        self.max_batch_bytes = max_batch_bytes
        self.bar = bar
        self.rows_written = 0

    def write(
        self, table: pa.Table | pa.RecordBatch | pd.DataFrame, vectors: np.ndarray, *, on_give_up: str = ""
    ) -> list[str]:
        """Upsert one batch; returns the keys written.

        Raises:
            DataError / MismatchError: before anything of the batch is sent (bad vectors, too-long strings).
            ConnectorError: Milvus refused or stayed unreachable (``on_give_up`` says how to resume).
        """
        rows = self.spec.encode(table, vectors)
        if not rows:
            return []
        per_row = self.spec.dim * 4 + 64 + sum(len(str(v)) for k, v in rows[0].items() if k != VECTOR_FIELD)
        step = max(1, self.max_batch_bytes // max(per_row * 2, 1))  # x2: the first row may be short
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            self.conn.upsert(self.spec.name, chunk, on_give_up=on_give_up)
            self.rows_written += len(chunk)
            if self.bar is not None:
                self.bar.update(len(chunk))
        return [r[PK_FIELD] for r in rows]


def progress_bar(total: int | None, initial: int, desc: str, enabled: bool) -> Any:
    """A vectors/s progress bar (tqdm), disabled unless ``enabled``."""
    return tqdm(
        total=total,
        initial=initial,
        unit="vec",
        unit_scale=True,
        desc=desc,
        disable=not enabled,
        dynamic_ncols=True,
        smoothing=0.1,
    )


def _key_column(spec: CollectionSpec) -> str:
    return "content_hash" if spec.key == "content_hash" else "id"


def source_keys(files: Sequence[Path], spec: CollectionSpec) -> list[str]:
    """The distinct primary keys of shard files under ``spec``'s key mode (record id or content hash), sorted.

    Raises:
        DataError: a shard lacks the column the key is made from.
    """
    col = _key_column(spec)
    values: list[Any] = []
    for f in files:
        names = read_schema(f).names
        use = col if col in names else (RECORD_ID_FIELD if RECORD_ID_FIELD in names and col == "id" else None)
        if use is None:
            raise DataError(f"shard {str(f)!r} has no {col!r} column; it is needed for the {spec.key} key")
        values.extend(pq.read_table(f, columns=[use]).column(use).to_pylist())
    return sorted(set(primary_keys(values)))


def missing_keys(conn: MilvusConnector, collection: str, keys: Sequence[str], *, chunk: int = 1000) -> list[str]:
    """The keys of ``keys`` that the collection does not hold."""
    conn.ensure_loaded(collection)
    missing: list[str] = []
    for start in range(0, len(keys), chunk):
        part = list(keys[start : start + chunk])
        got = conn.call("get", conn.client.get, collection, ids=part, output_fields=[PK_FIELD])
        present = {r[PK_FIELD] for r in got}
        missing.extend(k for k in part if k not in present)
    return missing


def verify_load(
    conn: MilvusConnector,
    collection: str,
    keys: Sequence[str],
    count_before: int | None,
    final: int,
    *,
    resumed_from: Path | None = None,
) -> tuple[int | None, bool]:
    """(expected count or None, verified) for a load whose source keys are ``keys``.

    Into a collection that was empty, the count must equal the number of keys; into one that held rows,
    every key must be there. ``resumed_from``: the resume state that made this run skip rows; missing rows are
    then rows deleted since they were sent, which only a restart (``--restart``, ``resume=False``) sends again.

    Raises:
        ConnectorError: rows are missing (named by key).
    """
    if resumed_from is not None:
        lost = missing_keys(conn, collection, keys)
        if lost:
            raise ConnectorError(
                f"{len(lost)} of {len(keys)} records are not in collection {collection!r} (e.g. keys {lost[:3]}), "
                f"although the resume state {str(resumed_from)!r} says they were sent (rows deleted since?); "
                f"re-run with --restart (resume=False) to send every row again"
            )
    if count_before == 0:
        ok = final == len(keys)
        if not ok:
            lost = missing_keys(conn, collection, keys)
            raise ConnectorError(
                f"collection {collection!r} holds {final} rows after the load but the source has "
                f"{len(keys)} distinct records ({len(lost)} missing, e.g. {lost[:3]}); re-run the "
                f"load (it is idempotent) and check the server's logs"
            )
        return len(keys), True
    lost = missing_keys(conn, collection, keys)
    if lost:
        raise ConnectorError(
            f"{len(lost)} of {len(keys)} loaded records are not in collection {collection!r} "
            f"(e.g. keys {lost[:3]}); re-run the load (it is idempotent)"
        )
    return None, True


def load_shards(
    conn: MilvusConnector,
    collection: str,
    shards: str | Path | Sequence[str | Path],
    *,
    bundle: BundleLike | None = None,
    index: IndexSpec | str | None = None,
    key: KeyMode = "record_id",
    batch_rows: int = DEFAULT_BATCH_ROWS,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    state_path: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    verify: bool = True,
    exclude_columns: Sequence[str] = (),
) -> LoadReport:
    """Load Parquet shards written by ``deepfeat embed`` into ``collection`` (created if missing).

    Args:
        conn: the connector.
        collection: target collection (created from the shards' bundle fingerprint and columns).
        shards: a shard directory, one shard, or a list of shard files.
        bundle: the model bundle the shards must come from (checked); default: the shards' own record.
        index: the index for a new collection (:class:`IndexSpec` or ``"HNSW:M=32"``).
        key: primary key from ``record_id`` or ``content_hash``.
        batch_rows: rows read and upserted per batch (split further to stay below ``max_batch_bytes``).
        state_path: the resume state file; default ``<shard dir>/_load_state.<collection>.json``.
        resume: continue an interrupted load from the state file (``False`` starts over; the upserts are
            idempotent either way).
        progress: show a progress bar (vectors/s).
        verify: check the final count (or, for a collection that held rows before, every key).

    Long because it is one resumable load around a single ``LoadState``: the state is opened against the
    collection, records ``count_before``, is marked after every written batch and set complete only after
    verification, so each step reads or writes the resume state the others depend on.

    Raises:
        MismatchError: shards of several bundles, or of another bundle than the collection's.
        DataError: a shard is unusable (not Parquet, a damaged bundle record, no vectors, NaN/Inf vectors, no ids,
            null or repeated ids: refused before anything is sent).
        ConnectorError: Milvus refused or stayed unreachable; the message says what is in and how to resume.
    """
    start = time.perf_counter()
    files = list_shards(shards)
    fp = common_fingerprint(files)
    check_ids(files)  # before anything is sent: null or repeated ids would silently collapse into fewer rows
    if bundle is not None:
        check_compatible(fingerprint_of(bundle), fp, what=f"shards {str(files[0].parent)!r}")
    spec = CollectionSpec.from_bundle(
        collection, fp, metadata=read_schema(files[0]), index=index, key=key, exclude=exclude_columns
    )
    existed = conn.has_collection(collection)  # a state for a collection that is gone is stale
    spec = create_collection(conn, spec)
    spec.check_fields([n for n in read_schema(files[0]).names if n != VECTOR_FIELD])
    if state_path is None:
        state_path = (
            Path(shards) if isinstance(shards, str | Path) and Path(shards).is_dir() else files[0].parent
        ) / f"_load_state.{collection}.json"
    state = LoadState.open(
        Path(state_path),
        collection=collection,
        bundle_id=str(fp.get("bundle_id")),
        batch_rows=batch_rows,
        resume=resume and existed,
    )
    if state.data["count_before"] is None:
        state.data["count_before"] = conn.count(collection) if existed else 0
        state.save()
    elif state.batch_rows != batch_rows:
        log.info("resuming with the first run's batch size %d (not %d)", state.batch_rows, batch_rows)
    metas = [(f, pq.ParquetFile(f).metadata.num_rows, f.stat().st_size) for f in files]
    total = sum(rows for _, rows, _ in metas)
    entries = {f.name: state.shard(f.name, size, rows) for f, rows, size in metas}
    resumed = sum(int(e["rows_done"]) for e in entries.values())
    if resumed:
        log.info("resuming the load into %s: %d of %d rows are already in", collection, resumed, total)
    wanted = set([*spec.field_names, "id", "content_hash", VECTOR_FIELD]) - {"model_version"}
    t_write = time.perf_counter()
    bar = progress_bar(total, resumed, f"load {collection}", progress)
    writer = BatchWriter(conn, spec, max_batch_bytes=max_batch_bytes, bar=bar)
    try:
        for f, _rows, _size in metas:
            entry = entries[f.name]
            if entry["done"]:
                continue
            pf = pq.ParquetFile(f)
            columns = [c for c in pf.schema_arrow.names if c in wanted]
            skip = int(entry["batches_done"])
            index_in_shard = 0
            for index_in_shard, batch in enumerate(
                pf.iter_batches(batch_size=state.batch_rows, columns=columns), start=1
            ):
                if index_in_shard <= skip:
                    continue
                vectors = batch_vectors(batch, spec.dim, f"shard {f.name}")
                writer.write(batch, vectors, on_give_up=state.resume_hint(total))
                state.mark(f.name, index_in_shard, len(batch), done=False)
            state.mark(f.name, max(index_in_shard, skip), 0, done=True)
    finally:
        bar.close()
    conn.flush(collection)
    write_seconds = time.perf_counter() - t_write
    final = conn.count(collection)
    expected: int | None = None
    verified = False
    if verify:
        expected, verified = verify_load(
            conn,
            collection,
            source_keys(files, spec),
            state.data["count_before"],
            final,
            resumed_from=state.path if resumed else None,
        )
    state.data["complete"] = True
    state.save(sync=True)
    report = LoadReport(
        collection,
        writer.rows_written,
        resumed,
        total,
        expected,
        final,
        verified,
        time.perf_counter() - start,
        state.path,
        write_seconds=write_seconds,
    )
    log.info(
        "loaded %d rows into %s (%d resumed) at %.0f vectors/s; count %d",
        report.rows_written,
        collection,
        resumed,
        report.vectors_per_second,
        final,
    )
    return report


def load_embeddings(
    conn: MilvusConnector,
    collection: str,
    batches: Iterable[tuple[pd.DataFrame, np.ndarray]],
    *,
    bundle: BundleLike,
    metadata: pd.DataFrame | None = None,
    index: IndexSpec | str | None = None,
    key: KeyMode = "record_id",
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    state_path: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    total: int | None = None,
    verify: bool = True,
) -> LoadReport:
    """Load an iterator of ``(records, vectors)`` batches (e.g. ``iter_embeddings``) into ``collection``.

    With ``state_path``, the number of batches durably in is recorded after each one; a re-run skips
    that many batches of the iterator, which must then yield the same batches in the same order
    (without a state, a re-run simply upserts everything again: no duplicates either way).

    Args:
        bundle: the model bundle that produced the vectors (recorded on, and checked against, the collection).
        metadata: a record table whose columns define the scalar fields of a new collection
            (default: the first batch's columns).
    """
    start = time.perf_counter()
    it: Iterator[tuple[pd.DataFrame, np.ndarray]] = iter(batches)
    first = next(it, None)
    if first is None:
        raise DataError(f"nothing to load into {collection!r}: the batch iterator is empty")
    spec = CollectionSpec.from_bundle(
        collection, bundle, metadata=metadata if metadata is not None else first[0], index=index, key=key
    )
    existed = conn.has_collection(collection)
    spec = create_collection(conn, spec)
    spec.check_fields([str(c) for c in first[0].columns])
    state = LoadState.open(
        Path(state_path) if state_path else None,
        collection=collection,
        bundle_id=str(spec.fingerprint.get("bundle_id")),
        batch_rows=0,
        resume=resume and existed,
    )
    if state.data["count_before"] is None:
        state.data["count_before"] = conn.count(collection) if existed else 0
        state.save()
    skip = int(state.data.get("batches_done", 0))
    resumed = state.rows_done
    t_write = time.perf_counter()
    bar = progress_bar(total, resumed, f"load {collection}", progress)
    writer = BatchWriter(conn, spec, max_batch_bytes=max_batch_bytes, bar=bar)
    keys: set[str] = set()
    n_source = 0
    try:
        for i, (rows, vectors) in enumerate(_chain(first, it)):
            n_source += len(rows)
            if i < skip:
                col = _key_column(spec)
                keys.update(primary_keys(rows[col].astype(str).tolist() if col in rows else []))
                continue
            hint = state.resume_hint(total or n_source)
            keys.update(writer.write(rows, vectors, on_give_up=hint))
            state.mark_batch(len(rows))
    finally:
        bar.close()
    conn.flush(collection)
    write_seconds = time.perf_counter() - t_write
    final = conn.count(collection)
    expected: int | None = None
    verified = False
    if verify:
        expected, verified = verify_load(conn, collection, sorted(keys), state.data["count_before"], final)
    state.data["complete"] = True
    state.save(sync=True)
    return LoadReport(
        collection,
        writer.rows_written,
        resumed,
        n_source,
        expected,
        final,
        verified,
        time.perf_counter() - start,
        state.path,
        write_seconds=write_seconds,
    )


def _chain(
    first: tuple[pd.DataFrame, np.ndarray], rest: Iterator[tuple[pd.DataFrame, np.ndarray]]
) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    yield first
    yield from rest


def remove_state(path: str | Path) -> None:
    """Delete a load state file (after a finished load, when it is no longer wanted)."""
    with contextlib.suppress(FileNotFoundError):
        Path(path).unlink()
