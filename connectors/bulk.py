"""Server bulk import: pymilvus' BulkWriter to Parquet, an import job per shard, polled to completion.

The scale-out path for a Milvus server (Milvus Lite has no bulk import). Each shard is rewritten by
BulkWriter into the server's storage (a folder the server reads, or its MinIO/S3 bucket), imported by
a job, and polled until the job is *Completed*: an accepted job is not a finished one (a job reports
*Persisted* before its data is queryable, and may still fail). Then the index is built, the
collection loaded and the count checked. Job ids go into the resume state, so a re-run after a crash
polls the submitted jobs instead of importing the same files twice.

An import appends: it is for a new (or alias-switched) collection, not for updating rows; use
:func:`~deepfeat.connectors.load.load_shards` (upsert) for that.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from deepfeat.connectors.client import MilvusConnector
from deepfeat.connectors.collection import BundleLike, create_collection, create_index
from deepfeat.connectors.fields import VECTOR_FIELD, KeyMode
from deepfeat.connectors.index import IndexSpec
from deepfeat.connectors.load import LoadReport, LoadState, batch_vectors, progress_bar, source_keys, verify_load
from deepfeat.connectors.schema import CollectionSpec, fingerprint_of
from deepfeat.finetune.errors import ConnectorError, MissingExtraError
from deepfeat.finetune.inference.shards import check_ids, common_fingerprint, list_shards, read_schema
from deepfeat.finetune.models.bundle import check_compatible

log = logging.getLogger(__name__)

_PENDING, _FAILED, _STARTED, _PERSISTED, _COMPLETED, _FAILED_CLEANED = 0, 1, 2, 5, 6, 7


@dataclass(frozen=True)
class BulkStaging:
    """Where BulkWriter puts the import files so that the Milvus server can read them.

    Either ``local_dir``: a folder the server reads at the same absolute path (the local storage of a
    standalone server on this machine, or a shared mount); or an S3/MinIO bucket of the server
    (``s3_endpoint``, ``s3_bucket``, keys), with files under ``remote_path``.
    """

    local_dir: str | None = None
    remote_path: str = "deepfeat-import"
    s3_endpoint: str | None = None
    s3_bucket: str = "a-bucket"
    s3_access_key: str | None = field(default=None, repr=False)
    s3_secret_key: str | None = field(default=None, repr=False)
    s3_secure: bool = False

    def __post_init__(self) -> None:
        if (self.local_dir is None) == (self.s3_endpoint is None):
            raise ConnectorError(
                "bulk import needs exactly one staging place: local_dir (a folder the server "
                "reads) or s3_endpoint (the server's MinIO/S3)"
            )

    def writer(self, schema: Any, chunk_mb: int) -> Any:
        """A pymilvus BulkWriter for Parquet files."""
        try:
            from pymilvus.bulk_writer import BulkFileType, LocalBulkWriter, RemoteBulkWriter
        except ModuleNotFoundError as exc:
            raise MissingExtraError("pymilvus[bulk_writer]", "bulk", "bulk import into a Milvus server") from exc
        if self.local_dir is not None:
            root = Path(self.local_dir).resolve()
            root.mkdir(parents=True, exist_ok=True)
            return LocalBulkWriter(
                schema=schema, local_path=str(root), chunk_size=chunk_mb << 20, file_type=BulkFileType.PARQUET
            )
        param = RemoteBulkWriter.S3ConnectParam(
            endpoint=self.s3_endpoint,
            access_key=self.s3_access_key,
            secret_key=self.s3_secret_key,
            bucket_name=self.s3_bucket,
            secure=self.s3_secure,
        )
        return RemoteBulkWriter(
            schema=schema,
            remote_path=self.remote_path,
            connect_param=param,
            chunk_size=chunk_mb << 20,
            file_type=BulkFileType.PARQUET,
        )


class _JobFailed(ConnectorError):
    """An import job ended in a failed state."""


def _handler(conn: MilvusConnector) -> Any:
    """The client's gRPC handler, which exposes the Import RPC on every Milvus 2.3+ server."""
    get = getattr(conn.client, "_get_connection", None)
    handler = get() if callable(get) else None
    if handler is None or not hasattr(handler, "do_bulk_insert"):
        raise ConnectorError("this pymilvus has no bulk insert RPC; install pymilvus>=2.4")
    return handler


def _write_files(staging: BulkStaging, spec: CollectionSpec, shard: Path, batch_rows: int, chunk_mb: int) -> list[str]:
    writer = staging.writer(spec.to_schema(), chunk_mb)
    pf = pq.ParquetFile(shard)
    for batch in pf.iter_batches(batch_size=batch_rows):
        vectors = batch_vectors(batch, spec.dim, f"shard {shard.name}")
        for row in spec.encode(batch, vectors):
            row[VECTOR_FIELD] = row[VECTOR_FIELD].tolist()
            writer.append_row(row)
    writer.commit()
    files = [str(f) for group in writer.batch_files for f in group]
    if not files:
        raise ConnectorError(f"BulkWriter wrote no file for shard {shard.name}; is the shard empty?")
    return files


def _poll(conn: MilvusConnector, job: int, *, timeout: float, interval: float, what: str) -> int:
    handler = _handler(conn)
    deadline = time.monotonic() + timeout
    last = None
    while True:
        st = conn.call("get_bulk_insert_state", handler.get_bulk_insert_state, job)
        if st.state != last:
            log.info("import job %s (%s): %s, %s rows", job, what, st.state_name, st.row_count)
            last = st.state
        if st.state == _COMPLETED:
            return int(st.row_count)
        if st.state in (_FAILED, _FAILED_CLEANED):
            raise _JobFailed(
                f"import job {job} ({what}) failed on the server: {st.failed_reason}. Fix the cause "
                f"and re-run (finished jobs are kept, this one is submitted again)"
            )
        if time.monotonic() > deadline:
            raise ConnectorError(
                f"import job {job} ({what}) is still {st.state_name} after {timeout:.0f}s; re-run "
                f"the same command to keep waiting for it (it is not submitted again)"
            )
        time.sleep(interval)


def bulk_import_shards(
    conn: MilvusConnector,
    collection: str,
    shards: str | Path | Sequence[str | Path],
    *,
    staging: BulkStaging,
    bundle: BundleLike | None = None,
    index: IndexSpec | str | None = None,
    key: KeyMode = "record_id",
    state_path: str | Path | None = None,
    batch_rows: int = 10_000,
    chunk_mb: int = 512,
    poll_interval: float = 1.0,
    timeout: float = 3600.0,
    progress: bool = True,
    verify: bool = True,
) -> LoadReport:
    """Import Parquet shards into a new collection on a Milvus server with import jobs.

    Long because it is one resumable import around a single ``LoadState``: every job submission, completion or
    failure is saved to the state's ``jobs`` before the next step, both the submit and the poll loop skip what that
    state says is done, and it is set complete only after verification, so a re-run continues where this one stopped.

    Raises:
        ConnectorError: Milvus Lite (no bulk import), a non-empty collection (an import appends, so rows
            would be duplicated), a failed job, or a job still running at ``timeout``.
        MissingExtraError: pymilvus' bulk_writer extra is not installed.
    """
    if conn.is_lite:
        raise ConnectorError(
            "Milvus Lite has no bulk import; use load_shards ('deepfeat load'), which upserts, or "
            "a Milvus server URI (http://host:19530)"
        )
    start = time.perf_counter()
    files = list_shards(shards)
    fp = common_fingerprint(files)
    check_ids(files)  # an import appends: a repeated id would be two rows, a null one a row without a record
    if bundle is not None:
        check_compatible(fingerprint_of(bundle), fp, what=f"shards {str(files[0].parent)!r}")
    existed = conn.has_collection(collection)
    spec = CollectionSpec.from_bundle(collection, fp, metadata=read_schema(files[0]), index=index, key=key)
    spec = create_collection(conn, spec, index=False, load=False)
    if state_path is None:
        state_path = files[0].parent / f"_import_state.{collection}.json"
    state = LoadState.open(
        Path(state_path),
        collection=collection,
        bundle_id=str(fp.get("bundle_id")),
        batch_rows=batch_rows,
        resume=existed,
    )
    if state.data["count_before"] is None:
        stats = conn.call("get_collection_stats", conn.client.get_collection_stats, collection)
        before = int(stats.get("row_count", 0))
        if before:
            raise ConnectorError(
                f"collection {collection!r} already holds {before} rows; an import appends and would "
                f"duplicate them. Import into a new collection (then switch an alias), or use "
                f"'deepfeat load', which upserts"
            )
        state.data["count_before"] = 0
        state.save()
    jobs: dict[str, Any] = state.data.setdefault("jobs", {})
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    handler = _handler(conn)
    for f in files:
        job = jobs.get(f.name, {})
        if job.get("status") in ("submitted", "completed"):
            continue
        paths = _write_files(staging, spec, f, batch_rows, chunk_mb)
        job_id = conn.call("bulk insert", handler.do_bulk_insert, collection, "", paths)
        jobs[f.name] = {"status": "submitted", "job": int(job_id), "files": paths}
        state.save(sync=True)
        log.info("submitted import job %s for %s (%d files)", job_id, f.name, len(paths))
    done = sum(int(j.get("rows", 0)) for j in jobs.values() if j.get("status") == "completed")
    t_write = time.perf_counter()
    bar = progress_bar(total, done, f"import {collection}", progress)
    written = 0
    try:
        for f in files:
            job = jobs[f.name]
            if job["status"] == "completed":
                continue
            try:
                rows = _poll(conn, int(job["job"]), timeout=timeout, interval=poll_interval, what=f.name)
            except _JobFailed:
                job["status"] = "failed"  # a re-run writes and submits this shard again
                state.save()
                raise
            job.update(status="completed", rows=rows)
            state.data["rows_done"] = state.rows_done + rows
            state.save()
            written += rows
            bar.update(rows)
            if staging.local_dir is not None:
                for p in job.get("files", []):
                    _remove_quietly(p)
    finally:
        bar.close()
    create_index(conn, spec)
    conn.flush(collection)
    write_seconds = time.perf_counter() - t_write
    final = conn.count(collection)
    expected: int | None = None
    verified = False
    if verify:
        expected, verified = verify_load(conn, collection, source_keys(files, spec), 0, final)
    state.data["complete"] = True
    state.save(sync=True)
    return LoadReport(
        collection,
        written,
        done,
        total,
        expected,
        final,
        verified,
        time.perf_counter() - start,
        state.path,
        write_seconds=write_seconds,
    )


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        return
