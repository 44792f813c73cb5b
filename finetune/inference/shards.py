"""The embedding shard contract, written and read in one place (``docs/contracts.md``, "Embedding shards").

A shard directory holds Parquet files ``part-NNNNN.parquet``: columns ``id`` (string), ``vector``
(fixed_size_list<float32>[dim]), ``label``, ``split``, ``group``, ``path``, ``content_hash`` and free
metadata columns; the schema metadata key ``b"deepfeat.bundle"`` holds the bundle fingerprint as JSON.
``_report.json`` lists the inputs that were skipped. Every shard is written to a temporary name, fsynced and
renamed, so a reader (or a resumed run) never sees half a shard; :class:`ShardWriter` resumes a directory
by keeping its complete shards and skipping their ids.

Every engine writes through :class:`ShardWriter` (the local DataLoader path in
:mod:`~deepfeat.finetune.inference.embed`, Ray Data in :mod:`~deepfeat.finetune.inference.distributed`),
and every reader (:func:`read_shards`, the Milvus loaders in ``deepfeat.connectors``) reads through
:func:`list_shards`, :func:`shard_fingerprint` and :func:`check_ids`, which refuse a damaged shard
(not Parquet, a fingerprint that is not JSON) and null or duplicate ids with one line naming the file or
the ids and the fix.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from deepfeat.finetune.data.dataset import SkipReport
from deepfeat.finetune.errors import DataError, DeepfeatError, MismatchError

log = logging.getLogger(__name__)

#: schema metadata key of the bundle fingerprint (JSON)
BUNDLE_METADATA_KEY = b"deepfeat.bundle"
#: the shard files of a directory
SHARD_GLOB = "part-*.parquet"
#: the skipped inputs of a run, next to the shards
REPORT_NAME = "_report.json"
#: record columns never written as metadata (the vector is written apart; in-memory images are not data)
RESERVED_COLUMNS = ("vector", "image")
#: the id column of deepfeat's shards, and the one Parquet files exported from Milvus carry instead
ID_COLUMNS = ("id", "record_id")

_SHARD_NAME = re.compile(r"part-(\d+)\.parquet")
_REMAKE = "delete it and re-run 'deepfeat embed' with the same --out (its records are embedded again)"


def shard_path(out_dir: str | Path, index: int) -> Path:
    """The path of shard number ``index`` in ``out_dir`` (``part-00042.parquet``)."""
    return Path(out_dir) / f"part-{index:05d}.parquet"


def list_shards(shards: str | Path | Sequence[str | Path]) -> list[Path]:
    """Shard files: a directory's ``part-*.parquet`` (sorted), one file, or a list of files.

    Raises:
        DataError: nothing to read, or files that do not exist.
    """
    if isinstance(shards, str | Path):
        root = Path(shards)
        if root.is_dir():
            files = sorted(root.glob(SHARD_GLOB))
        elif root.is_file():
            files = [root]
        else:
            raise DataError(f"shards {str(root)!r} do not exist; pass the --out directory of 'deepfeat embed'")
    else:
        files = [Path(p) for p in shards]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise DataError(f"shard files not found: {missing[:5]}; pass files written by 'deepfeat embed'")
    if not files:
        raise DataError(f"no shards ({SHARD_GLOB}) in {str(shards)!r}; create them with 'deepfeat embed'")
    return files


def read_schema(path: Path) -> pa.Schema:
    """The Arrow schema of a shard.

    Raises:
        DataError: the file is empty, not Parquet, or unreadable.
    """
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise DataError(f"shard {str(path)!r} is not a readable Parquet file ({reason}); {_REMAKE}") from exc


def shard_fingerprint(path: Path) -> dict[str, Any]:
    """The bundle fingerprint stored in a shard's schema metadata.

    Raises:
        DataError: the shard is not Parquet, records no bundle, or its record is not a JSON object.
    """
    raw = (read_schema(path).metadata or {}).get(BUNDLE_METADATA_KEY)
    if not raw:
        raise DataError(
            f"shard {str(path)!r} records no model bundle (schema metadata {BUNDLE_METADATA_KEY!r}); "
            f"write shards with 'deepfeat embed', or pass bundle= for foreign Parquet files"
        )
    try:
        fingerprint = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(
            f"shard {str(path)!r} has a damaged bundle record (schema metadata {BUNDLE_METADATA_KEY!r} is not "
            f"JSON: {bytes(raw[:40])!r}...); {_REMAKE}"
        ) from exc
    if not isinstance(fingerprint, dict):
        raise DataError(
            f"shard {str(path)!r} has a damaged bundle record (a JSON {type(fingerprint).__name__}, not an "
            f"object); {_REMAKE}"
        )
    return fingerprint


def common_fingerprint(files: Sequence[Path]) -> dict[str, Any]:
    """The one bundle fingerprint of ``files``.

    Raises:
        DataError: a shard is damaged (see :func:`shard_fingerprint`).
        MismatchError: shards of several bundles.
    """
    fingerprint = shard_fingerprint(files[0])
    for f in files[1:]:
        other = shard_fingerprint(f)
        if other.get("bundle_id") != fingerprint.get("bundle_id"):
            raise MismatchError(
                f"shards of different model bundles: {files[0].name} has {fingerprint.get('bundle_id')!r}, "
                f"{f.name} has {other.get('bundle_id')!r}; load each bundle's shards into its own collection"
            )
    return fingerprint


def id_column(schema: pa.Schema) -> str | None:
    """The record-id column of a shard's schema (``id``, or ``record_id`` in foreign files), if any."""
    return next((c for c in ID_COLUMNS if c in schema.names), None)


def shard_ids(path: Path) -> list[str]:
    """The record ids of one shard, as strings.

    Raises:
        DataError: the shard is damaged, has no id column, or has rows with a null id.
    """
    column = id_column(read_schema(path))
    if column is None:
        raise DataError(f"shard {str(path)!r} has no 'id' column; write shards with 'deepfeat embed'")
    try:
        values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise DataError(f"shard {str(path)!r} cannot be read ({reason}); {_REMAKE}") from exc
    nulls = [i for i, v in enumerate(values) if v is None]
    if nulls:
        raise DataError(
            f"shard {str(path)!r} has {len(nulls)} row(s) with a null {column!r} (rows {nulls[:5]}); every "
            f"vector needs a record id: give those records ids and re-embed them"
        )
    return [str(v) for v in values]


def check_ids(files: Iterable[Path]) -> set[str]:
    """All record ids of ``files``, refusing null ids and ids that occur more than once (across all files).

    Raises:
        DataError: a null id, or duplicates (named, with the shards that hold them).
    """
    seen: dict[str, Path] = {}
    counts: Counter[str] = Counter()
    where: dict[str, set[str]] = {}
    for f in files:
        for rid in shard_ids(f):
            counts[rid] += 1
            if rid in seen:
                where.setdefault(rid, {seen[rid].name}).add(f.name)
            else:
                seen[rid] = f
    if where:
        dups = sorted(where)
        named = ", ".join(f"{rid!r} x{counts[rid]} ({', '.join(sorted(where[rid]))})" for rid in dups[:5])
        raise DataError(
            f"{len(dups)} record id(s) occur more than once in the shards: {named}"
            f"{' ...' if len(dups) > 5 else ''}; each id must be one vector: remove the extra shards (or rows), "
            f"or re-embed into an empty --out"
        )
    return set(seen)


def shard_table(rows: pd.DataFrame, vectors: np.ndarray, fingerprint: dict[str, Any]) -> pa.Table:
    """One shard's table: the records' metadata columns, ``vector`` and the fingerprint in the schema metadata."""
    cols: dict[str, pa.Array] = {}
    for c in rows.columns:
        if c in RESERVED_COLUMNS:
            continue
        values = rows[c]
        if values.dtype == object or isinstance(values.dtype, pd.StringDtype):  # pandas 3: str, NaN for None
            # a list, not Series.map: map turns None into NaN, and a NaN among strings fails in pyarrow
            # (records mixing files and in-memory images); typed string, so all-None shards still concat
            texts = [None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in values]
            cols[str(c)] = pa.array(texts, type=pa.string())
        else:
            cols[str(c)] = pa.array(values.tolist())
    dim = vectors.shape[1]
    cols["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), dim)
    table = pa.table(cols)
    return table.replace_schema_metadata({BUNDLE_METADATA_KEY: json.dumps(fingerprint).encode()})


def write_table_atomic(table: pa.Table, path: Path) -> None:
    """Write a Parquet file to a temporary name, fsync, then rename: readers never see half a file.

    Raises:
        DeepfeatError: the file cannot be written (disk full, no permission); no partial file is left.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise DeepfeatError(
            f"cannot write shard {str(path)!r}: {exc.strerror or exc}. Shards written before "
            f"it are complete; free space (or choose another --out) and re-run: finished "
            f"shards are kept"
        ) from exc


class ShardWriter:
    """Writes ``(rows, vectors)`` batches as shards of ``shard_size`` rows into ``out_dir``, resuming it.

    On opening, the complete shards already there are checked (same bundle, readable, no null or repeated
    id): their ids are :attr:`done_ids`, which a run skips; new shards are numbered after the highest one.
    Memory stays at one shard of vectors.

    Raises:
        DataError: ``out_dir`` holds shards of another bundle, damaged shards, or null/repeated ids.
    """

    def __init__(self, out_dir: str | Path, fingerprint: dict[str, Any], *, shard_size: int = 50_000) -> None:
        if shard_size < 1:
            raise DataError(f"shard_size must be at least 1, got {shard_size}")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.fingerprint = dict(fingerprint)
        self.shard_size = shard_size
        self.shards: list[Path] = sorted(self.out.glob(SHARD_GLOB))
        for shard in self.shards:
            got = shard_fingerprint(shard)
            if got.get("bundle_id") != self.fingerprint.get("bundle_id"):
                raise DataError(
                    f"{str(self.out)!r} holds shards from another model bundle ({got.get('bundle_id')!r}, "
                    f"this one is {self.fingerprint.get('bundle_id')!r}); use an empty --out directory"
                )
        self.done_ids: set[str] = check_ids(self.shards)
        if self.done_ids:
            log.info("resuming: %d records already embedded in %d shards", len(self.done_ids), len(self.shards))
        # after the highest shard, never len(shards): with a gap (a shard removed by hand) that would overwrite
        # a complete shard whose ids were just counted as done, and lose them
        self._next = 1 + max((int(m.group(1)) for f in self.shards if (m := _SHARD_NAME.fullmatch(f.name))), default=-1)
        self._rows: list[pd.DataFrame] = []
        self._vectors: list[np.ndarray] = []
        self._pending = 0
        self.n_written = 0

    def add(self, rows: pd.DataFrame, vectors: np.ndarray) -> None:
        """Queue one batch; a shard is written whenever ``shard_size`` rows are queued."""
        if len(rows) != len(vectors):
            raise DataError(f"a batch of {len(rows)} rows came with {len(vectors)} vectors; they must match")
        if not len(rows):
            return
        self._rows.append(rows)
        self._vectors.append(vectors)
        self._pending += len(rows)
        self.n_written += len(rows)
        if self._pending >= self.shard_size:
            self.flush()

    def flush(self) -> Path | None:
        """Write the queued rows as one shard (atomically); returns its path, or None when nothing was queued."""
        if not self._pending:
            return None
        table = shard_table(pd.concat(self._rows), np.concatenate(self._vectors), self.fingerprint)
        path = shard_path(self.out, self._next)
        write_table_atomic(table, path)
        self.shards.append(path)
        self._next += 1
        self._rows, self._vectors, self._pending = [], [], 0
        return path

    def close(self, report: SkipReport) -> Path:
        """Write what is queued and the skip report (``_report.json``); returns the report's path."""
        self.flush()
        return report.write(self.out / REPORT_NAME)


def read_shards(path: str | Path) -> tuple[pd.DataFrame, np.ndarray, dict[str, Any]]:
    """Read all shards of a directory (or one file): (metadata rows, vectors (N, dim), bundle fingerprint).

    Raises:
        DataError: no shards, a damaged shard, null or repeated ids.
        MismatchError: shards of several bundles.
    """
    files = list_shards(path)
    fingerprint = common_fingerprint(files)
    check_ids(files)
    tables = [pq.read_table(f) for f in files]
    table = pa.concat_tables(tables)
    vec = table.column("vector").combine_chunks()
    dim = vec.type.list_size
    vectors = vec.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
    rows = table.drop(["vector"]).to_pandas()
    return rows, vectors, fingerprint
