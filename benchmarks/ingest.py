"""Ingest benchmark: ``deepfeat load`` against a direct pymilvus insert loop of the same vectors.

Three ways of putting the same N vectors (with the same metadata) into a fresh collection, in one run:

* ``direct``: a hand-written pymilvus loop: create the same collection (schema, index, load), then
  ``client.insert`` of ``--batch`` rows at a time, then flush;
* ``deepfeat``: :func:`deepfeat.connectors.load_shards` from Parquet shards (reading the shards, NaN
  checks, keyed upserts, the resume state written after every batch, flush and the final count check);
* ``row``: a row-at-a-time insert loop (on ``--row-rows`` rows, the anti-pattern).

Runs alternate (direct, deepfeat, direct, ...) in fresh databases; the best rate of each is compared.
Goal: deepfeat >= 0.95 x direct and >= 3 x row-at-a-time.

    python benchmarks/ingest.py                       # Milvus Lite in a temporary folder
    python benchmarks/ingest.py --rows 50000 --dim 768
    python benchmarks/ingest.py --uri http://localhost:19530   # a server (collections are dropped after)
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deepfeat.connectors import CollectionSpec, IndexSpec, connect, load_shards
from deepfeat.connectors.client import MilvusConnector
from deepfeat.connectors.schema import primary_keys


def fingerprint(dim: int) -> dict[str, Any]:
    """A bundle fingerprint as shards record it (the benchmark needs no model)."""
    return {
        "name": "bench",
        "bundle_id": "bench@000000000000",
        "embedding_dim": dim,
        "metric": "COSINE",
        "preprocessing": {
            "input_size": [224, 224],
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "interpolation": "bilinear",
            "crop_pct": 0.875,
            "resize_mode": "squash",
        },
    }


def make_data(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, dict[str, list[Any]]]:
    """Normalised vectors and record metadata."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"class_{i % 10}/image_{i:07d}.jpg" for i in range(n)]
    meta = {
        "id": ids,
        "path": [f"/data/{i}" for i in ids],
        "label": [f"class_{i % 10}" for i in range(n)],
        "split": ["train"] * n,
        "group": [f"product_{i // 4}" for i in range(n)],
        "content_hash": [f"{i:064x}" for i in range(n)],
    }
    return vectors, meta


def write_shards(out: Path, vectors: np.ndarray, meta: dict[str, list[Any]], shard_size: int) -> None:
    """Shards as ``deepfeat embed`` writes them."""
    out.mkdir(parents=True, exist_ok=True)
    dim = vectors.shape[1]
    for k, start in enumerate(range(0, len(vectors), shard_size)):
        sl = slice(start, start + shard_size)
        cols: dict[str, Any] = {name: pa.array(values[sl]) for name, values in meta.items()}
        cols["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(vectors[sl].reshape(-1)), dim)
        table = pa.table(cols).replace_schema_metadata({b"deepfeat.bundle": json.dumps(fingerprint(dim)).encode()})
        pq.write_table(table, out / f"part-{k:05d}.parquet")


class Target:
    """A fresh database (Milvus Lite) or a fresh collection name (server) per run."""

    def __init__(self, uri: str | None, work: Path) -> None:
        self.uri = uri
        self.work = work
        self.count = 0

    def open(self) -> tuple[MilvusConnector, str]:
        self.count += 1
        if self.uri is None:
            return connect(str(self.work / f"run{self.count}.db")), "bench"
        return connect(self.uri), f"deepfeat_bench_{self.count}"

    def close(self, conn: MilvusConnector, name: str) -> None:
        if self.uri is None:
            conn.release_lite()
            shutil.rmtree(self.work / f"run{self.count}.db", ignore_errors=True)
        else:
            conn.client.drop_collection(name)
            conn.close()


def create_same_collection(conn: MilvusConnector, name: str, dim: int, index: IndexSpec) -> None:
    """The collection deepfeat would create, made by hand (same schema and index)."""
    spec = CollectionSpec.from_bundle(name, fingerprint(dim), index=index)
    client = conn.client
    client.create_collection(name, schema=spec.to_schema())
    client.create_index(name, spec.index_params(client), sync=False)
    client.load_collection(name)


def run_direct(
    target: Target,
    vectors: np.ndarray,
    meta: dict[str, list[Any]],
    batch: int,
    index: IndexSpec,
    n_rows: int | None = None,
) -> float:
    """A direct pymilvus loop: build row dicts, insert ``batch`` at a time, flush. Returns vectors/s."""
    conn, name = target.open()
    try:
        n = len(vectors) if n_rows is None else n_rows
        keys = primary_keys(meta["id"][:n])
        start = time.perf_counter()  # from nothing to a loaded, flushed collection, as load_shards does
        create_same_collection(conn, name, vectors.shape[1], index)
        client = conn.client
        for s in range(0, n, batch):
            rows = [
                {
                    "pk": keys[i],
                    "vector": vectors[i],
                    "record_id": meta["id"][i],
                    "label": meta["label"][i],
                    "group": meta["group"][i],
                    "split": meta["split"][i],
                    "path": meta["path"][i],
                    "content_hash": meta["content_hash"][i],
                    "model_version": "bench@000000000000",
                }
                for i in range(s, min(s + batch, n))
            ]
            client.insert(name, rows)
        client.flush(name)
        seconds = time.perf_counter() - start
        return n / seconds
    finally:
        target.close(conn, name)


def run_deepfeat(target: Target, shards: Path, batch: int, index: IndexSpec, work: Path) -> tuple[float, float]:
    """``load_shards`` end to end. Returns (vectors/s over the whole call, vectors/s while writing)."""
    conn, name = target.open()
    try:
        state = work / f"state{target.count}.json"
        start = time.perf_counter()
        report = load_shards(conn, name, shards, index=index, batch_rows=batch, state_path=state, progress=False)
        seconds = time.perf_counter() - start
        assert report.verified and report.final_count == report.rows_total
        return report.rows_written / seconds, report.vectors_per_second
    finally:
        target.close(conn, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=20_000, help="vectors to ingest (default 20000)")
    parser.add_argument("--dim", type=int, default=512, help="vector dim (default 512)")
    parser.add_argument("--batch", type=int, default=2_000, help="rows per insert/upsert call (default 2000)")
    parser.add_argument("--shard-size", type=int, default=10_000, help="rows per Parquet shard (default 10000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loop (default 3)")
    parser.add_argument("--row-rows", type=int, default=1_000, help="rows for the row-at-a-time loop (default 1000)")
    parser.add_argument("--index", default="AUTOINDEX", help="index of the collections (default AUTOINDEX)")
    parser.add_argument("--uri", default=None, help="a Milvus server URI (default: Milvus Lite in a temp folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import milvus_lite
    import pymilvus

    index = IndexSpec.parse(args.index)
    work = Path(tempfile.mkdtemp(prefix="deepfeat-bench-"))
    try:
        vectors, meta = make_data(args.rows, args.dim)
        shards = work / "shards"
        write_shards(shards, vectors, meta, args.shard_size)
        target = Target(args.uri, work)
        direct: list[float] = []
        ours: list[float] = []
        ours_write: list[float] = []
        for _ in range(args.repeats):
            direct.append(run_direct(target, vectors, meta, args.batch, index))
            total, writing = run_deepfeat(target, shards, args.batch, index, work)
            ours.append(total)
            ours_write.append(writing)
        row = run_direct(target, vectors, meta, 1, index, n_rows=min(args.row_rows, args.rows))
        where = args.uri or f"Milvus Lite {milvus_lite.__version__}"
        best_direct, best_ours = max(direct), max(ours)
        print(
            f"ingest: {args.rows} vectors x dim {args.dim}, batch {args.batch}, index {index.index_type}, "
            f"{where}, pymilvus {pymilvus.__version__}, best of {args.repeats}"
        )
        print(f"  direct pymilvus insert loop   {best_direct:9.0f} vectors/s  (median {statistics.median(direct):.0f})")
        print(
            f"  deepfeat load_shards          {best_ours:9.0f} vectors/s  (median {statistics.median(ours):.0f}; "
            f"writing only {max(ours_write):.0f})"
        )
        print(f"  row-at-a-time insert loop     {row:9.0f} vectors/s  ({min(args.row_rows, args.rows)} rows)")
        ratio, vs_row = best_ours / best_direct, best_ours / row
        print(f"  deepfeat / direct = {ratio:.3f}  (goal >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})")
        print(f"  deepfeat / row-at-a-time = {vs_row:.1f}x  (goal >= 3x: {'met' if vs_row >= 3 else 'NOT met'})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
