"""Incremental sync of an image collection, and zero-downtime re-indexing behind an alias.

:func:`sync_records` compares the records (an image folder or a manifest) with the collection by
content hash: new and changed images are embedded and upserted, rows whose images are gone are
deleted, unchanged ones are not touched. :func:`reindex` fills a new collection with another model
bundle and then switches an alias to it in one step, so searches through the alias never see a
half-filled collection.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from deepfeat.connectors.client import MilvusConnector
from deepfeat.connectors.collection import create_collection, create_index, drop_collection, open_collection
from deepfeat.connectors.fields import PK_FIELD, RECORD_ID_FIELD, VECTOR_FIELD, KeyMode, primary_key
from deepfeat.connectors.index import IndexSpec
from deepfeat.connectors.load import BatchWriter
from deepfeat.connectors.schema import CollectionSpec
from deepfeat.finetune.data.dataset import SkipReport, record_source
from deepfeat.finetune.data.images import content_hash
from deepfeat.finetune.data.readers import read_records
from deepfeat.finetune.errors import ConnectorError, DataError, DeepfeatError, ImageDecodeError
from deepfeat.finetune.models.bundle import ModelBundle

log = logging.getLogger(__name__)

#: Turns records into ``(rows with content_hash, float32 vectors)`` batches, like ``iter_embeddings``.
Embedder = Callable[[pd.DataFrame], Iterable[tuple[pd.DataFrame, np.ndarray]]]


@dataclass
class SyncReport:
    """What a sync did (counts of records)."""

    collection: str
    added: int
    updated: int
    unchanged: int
    deleted: int
    skipped: int
    final_count: int
    seconds: float
    alias: str | None = None
    previous_collection: str | None = None
    dry_run: bool = False
    skipped_ids: list[str] = field(default_factory=list)
    #: record id -> why it was skipped (every one; ``skipped_ids`` in :meth:`to_dict` shows 100)
    skipped_reasons: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        return {
            "collection": self.collection,
            "alias": self.alias,
            "previous_collection": self.previous_collection,
            "added": self.added,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "deleted": self.deleted,
            "skipped": self.skipped,
            "final_count": self.final_count,
            "seconds": round(self.seconds, 3),
            "dry_run": self.dry_run,
            "skipped_ids": self.skipped_ids[:100],
        }


def _load_bundle(bundle: ModelBundle | str | Path) -> ModelBundle:
    return bundle if isinstance(bundle, ModelBundle) else ModelBundle.load(bundle)


def _read(records: pd.DataFrame | str | Path, root: str | Path | None) -> pd.DataFrame:
    # Missing files and broken links are kept as records: the sync reports and skips each one (and keeps
    # its row) instead of refusing the whole folder. A root is enforced (no path may leave it) for manifests
    # and tables; an image folder is its own root.
    is_folder = isinstance(records, str | Path) and Path(records).is_dir()
    kwargs: dict[str, Any] = {"root": root} if root is not None and not is_folder else {}
    return read_records(records, check_files=False, **kwargs).reset_index(drop=True)


def content_hashes(records: pd.DataFrame, root: str | Path | None = None) -> tuple[list[str | None], dict[str, str]]:
    """The content hash of each record (``None`` where the image cannot be read) and the reasons."""
    out: list[str | None] = []
    errors: dict[str, str] = {}
    for row in records.to_dict("records"):
        try:
            out.append(content_hash(record_source(row, root)))
        except (OSError, DeepfeatError) as exc:
            out.append(None)
            errors[str(row["id"])] = str(exc)
    return out, errors


def _default_embedder(
    bundle: ModelBundle,
    *,
    root: str | Path | None,
    batch_size: int,
    num_workers: int,
    progress: bool,
    skipped: dict[str, str],
    on_error: Literal["skip", "fail"] = "skip",
) -> Embedder:
    # deferred: the embed engine imports albumentations and OpenCV (seconds), which `import deepfeat.connectors`
    # (and every vector-search command) would otherwise pay for
    from deepfeat.finetune.inference.embed import iter_embeddings

    report = SkipReport()

    def embed(rows: pd.DataFrame) -> Iterable[tuple[pd.DataFrame, np.ndarray]]:
        yield from iter_embeddings(
            bundle,
            rows,
            batch_size=batch_size,
            num_workers=num_workers,
            on_error=on_error,
            report=report,
            root=root,
            progress=progress,
        )
        skipped.update({s["id"]: s["reason"] for s in report.skipped})

    return embed


@dataclass
class _SyncPlan:
    """What a sync has to do: the rows to embed, the rows stored now and the keys to delete."""

    todo: pd.DataFrame
    existing: dict[str, str]
    gone: list[str]
    n_new: int
    unchanged: int

    def dry_run_report(self, target: str, unreadable: dict[str, str], seconds: float) -> SyncReport:
        """The report of a dry run: what the sync would do, with nothing written."""
        return SyncReport(
            target,
            self.n_new,
            len(self.todo) - self.n_new,
            self.unchanged,
            len(self.gone),
            len(unreadable),
            len(self.existing),
            seconds,
            dry_run=True,
            skipped_ids=sorted(unreadable),
            skipped_reasons=dict(sorted(unreadable.items())),
        )


def _plan_sync(
    conn: MilvusConnector,
    target: str,
    table: pd.DataFrame,
    hashes: list[str | None],
    unreadable: dict[str, str],
    *,
    key: KeyMode,
    delete_missing: bool,
) -> _SyncPlan:
    """Compare the records' content hashes with the collection's rows, log the counts and return the plan."""
    table = table.assign(content_hash=pd.Series(hashes, index=table.index, dtype=object))
    readable = table[table["content_hash"].notna()]
    if key == "content_hash":
        keys = [primary_key(h) for h in readable["content_hash"]]
        first = ~pd.Series(keys).duplicated().to_numpy()  # identical images share one row
        readable, keys = readable[first], [k for k, keep in zip(keys, first, strict=True) if keep]
    else:
        keys = [primary_key(str(i)) for i in readable["id"]]
    existing: dict[str, str] = {}
    stored_ids: dict[str, str] = {}
    if conn.has_collection(target):
        for r in conn.iter_rows(target, [PK_FIELD, "content_hash", RECORD_ID_FIELD]):
            existing[r[PK_FIELD]] = r.get("content_hash") or ""
            stored_ids[r[PK_FIELD]] = str(r.get(RECORD_ID_FIELD))
    todo_mask = [existing.get(k) != h for k, h in zip(keys, readable["content_hash"], strict=True)]
    todo = readable[todo_mask]
    unchanged = len(readable) - len(todo)
    wanted = set(keys)
    # rows of records whose image cannot be read now are kept as they are, not deleted
    gone = [k for k in existing if k not in wanted and stored_ids[k] not in unreadable] if delete_missing else []
    n_new = sum(1 for k, m in zip(keys, todo_mask, strict=True) if m and k not in existing)
    log.info(
        "sync %s: %d new, %d changed, %d unchanged, %d gone, %d unreadable",
        target,
        n_new,
        len(todo) - n_new,
        unchanged,
        len(gone),
        len(unreadable),
    )
    return _SyncPlan(todo, existing, gone, n_new, unchanged)


def _write_changes(
    conn: MilvusConnector,
    spec: CollectionSpec,
    embed: Embedder,
    todo: pd.DataFrame,
    existing: dict[str, str],
    target: str,
) -> tuple[int, int, set[str]]:
    """Embed and write ``todo``; return the counts added and updated and the keys written."""
    writer = BatchWriter(conn, spec)
    added = updated = 0
    embedded_keys: set[str] = set()
    hint = "the records written so far are in; re-run the sync to finish (it only embeds what is still missing)"
    try:
        for rows, vectors in embed(todo):
            if spec.key == "content_hash" and "content_hash" not in rows:
                raise DataError("the embedder returned rows without 'content_hash'; it must add that column")
            for k in writer.write(rows, vectors, on_give_up=hint):
                embedded_keys.add(k)
                if k in existing:
                    updated += 1
                else:
                    added += 1
    except ConnectorError as exc:  # Milvus gone mid-way: say how much of this sync is in
        raise ConnectorError(
            f"{exc} ({added + updated} of {len(todo)} records to write were written before it)"
        ) from exc
    except ImageDecodeError as exc:  # on_error='fail': say what is in before stopping
        raise ImageDecodeError(
            exc.source, f"{exc.reason}. {added + updated} of {len(todo)} records to write were written before it "
            f"and are in {target!r}; fix the file and re-run the sync (it only embeds what is still missing)"
        ) from exc
    return added, updated, embedded_keys


def sync_records(
    conn: MilvusConnector,
    collection: str,
    records: pd.DataFrame | str | Path,
    bundle: ModelBundle | str | Path,
    *,
    root: str | Path | None = None,
    index: IndexSpec | str | None = None,
    key: KeyMode = "record_id",
    delete_missing: bool = True,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    dry_run: bool = False,
    embedder: Embedder | None = None,
    on_error: Literal["skip", "fail"] = "skip",
) -> SyncReport:
    """Bring ``collection`` (or the collection an alias points at) in line with ``records``.

    New and changed images (by content hash) are embedded with ``bundle`` and upserted; rows whose
    record is no longer in ``records`` are deleted (``delete_missing``); unchanged ones are skipped.
    Images that cannot be read are reported and left as they are in the collection.

    Args:
        records: a record table, or a source for ``read_records`` (image folder, CSV/Parquet manifest).
        bundle: the model bundle (must be the one that filled an existing collection).
        root: folder that relative paths in ``records`` are resolved against.
        embedder: replaces ``iter_embeddings`` (for tests or custom pipelines).
        on_error: ``skip`` reports each unreadable image (``SyncReport.skipped_reasons``) and goes on;
            ``fail`` refuses before writing when an image cannot be read, and stops at the first image
            that does not decode (what was written before it stays in; a re-run continues).

    Raises:
        MismatchError: the collection was filled by another bundle (use :func:`reindex`).
        ImageDecodeError / DataError: with ``on_error='fail'``, an image that cannot be read.
        ConnectorError: Milvus refused, or the final count is not what the sync implies.
    """
    if on_error not in ("skip", "fail"):
        raise DataError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    start = time.perf_counter()
    model = _load_bundle(bundle)
    table = _read(records, root)
    target = conn.resolve_alias(collection)
    exists = conn.has_collection(target)
    if exists:  # a collection of another bundle is refused before any image is read
        spec = open_collection(conn, target, bundle=model, what="syncing")
    hashes, unreadable = content_hashes(table, root)
    if on_error == "fail" and unreadable:
        example = next(iter(unreadable))
        raise DataError(
            f"{len(unreadable)} image(s) cannot be read, e.g. {example!r}: {unreadable[example]}. Nothing was "
            f"written; fix or remove them, or run with --on-error skip to skip and report them"
        )
    if not exists:
        spec = CollectionSpec.from_bundle(target, model, metadata=table, index=index, key=key)
        if not dry_run:
            spec = create_collection(conn, spec)
    elif not dry_run and VECTOR_FIELD not in conn.call("list_indexes", conn.client.list_indexes, target):
        # a sync killed between creating the collection and building its index: a server cannot load it
        log.info("collection %s has no vector index (an interrupted sync); building it now", target)
        create_index(conn, spec)
    plan = _plan_sync(conn, target, table, hashes, unreadable, key=spec.key, delete_missing=delete_missing)
    if dry_run:
        return plan.dry_run_report(target, unreadable, time.perf_counter() - start)
    todo, existing, gone = plan.todo, plan.existing, plan.gone
    skipped = dict(unreadable)
    embed = embedder or _default_embedder(
        model,
        root=root,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
        skipped=skipped,
        on_error=on_error,
    )
    added, updated, embedded_keys = _write_changes(conn, spec, embed, todo, existing, target)
    if embedder is not None:
        todo_ids = set(todo["id"].astype(str))
        written_ids = {i for i in todo_ids if primary_key(i) in embedded_keys} if spec.key == "record_id" else todo_ids
        for i in sorted(todo_ids - written_ids):
            skipped.setdefault(i, "not returned by the embedder")
    deleted = conn.delete(target, gone) if gone else 0
    conn.flush(target)
    final = conn.count(target)
    expected = len(existing) + added - deleted
    if final != expected:
        raise ConnectorError(
            f"collection {target!r} holds {final} rows after the sync, expected {expected} "
            f"({len(existing)} before + {added} added - {deleted} deleted); re-run the sync"
        )
    report = SyncReport(
        target,
        added,
        updated,
        plan.unchanged,
        deleted,
        len(skipped),
        final,
        time.perf_counter() - start,
        skipped_ids=sorted(skipped),
        skipped_reasons=dict(sorted(skipped.items())),
    )
    log.info("synced %s: %s", target, report.to_dict())
    return report


def reindex_name(alias: str, bundle_id: str) -> str:
    """The collection a re-index fills: ``<alias>__<bundle id>`` with unsafe characters replaced."""
    return re.sub(r"[^A-Za-z0-9_]", "_", f"{alias}__{bundle_id}")[:255]


def reindex(
    conn: MilvusConnector,
    alias: str,
    records: pd.DataFrame | str | Path,
    bundle: ModelBundle | str | Path,
    *,
    collection: str | None = None,
    drop_previous: bool = False,
    root: str | Path | None = None,
    index: IndexSpec | str | None = None,
    key: KeyMode = "record_id",
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    embedder: Embedder | None = None,
) -> SyncReport:
    """Fill a new collection with ``bundle``'s embeddings of ``records``, then switch ``alias`` to it.

    Clients that search through ``alias`` keep using the old collection until the new one is complete,
    indexed and loaded, then move in one step (zero downtime for a model upgrade). An interrupted
    re-index resumes: the new collection is synced incrementally on the next run.

    Args:
        alias: the alias clients use; created if missing (it cannot be the name of a collection).
        collection: the new collection's name (default ``<alias>__<bundle id>``).
        drop_previous: drop the collection the alias pointed at before (default: keep it for rollback).
    """
    model = _load_bundle(bundle)
    name = collection or reindex_name(alias, str(model.card.bundle_id))
    if name == alias:
        raise ConnectorError(f"the new collection cannot be named like the alias {alias!r}; pick another name")
    if alias in conn.call("list_collections", conn.client.list_collections) and alias not in conn.list_aliases():
        raise ConnectorError(
            f"{alias!r} is a collection, not an alias; re-index behind a new alias name (e.g. "
            f"'{alias}_live'), point clients at it, and drop {alias!r} when they have moved"
        )
    report = sync_records(
        conn,
        name,
        records,
        model,
        root=root,
        index=index,
        key=key,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
        embedder=embedder,
    )
    previous = conn.switch_alias(alias, name)
    report.alias = alias
    report.previous_collection = previous if previous != name else None
    if drop_previous and previous and previous != name:
        drop_collection(conn, previous)
        log.info("dropped the previous collection %s", previous)
    return report
