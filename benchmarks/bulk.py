"""Bulk-import benchmark: N vectors into a Milvus server by import jobs against the insert path, in one run.

The same Parquet shards (as ``deepfeat embed`` writes them) go into two fresh collections of one server:

* ``insert``: :func:`deepfeat.connectors.load_shards` (keyed upserts of ``--batch`` rows, flush, count check);
* ``bulk``: :func:`deepfeat.connectors.bulk_import_shards` (BulkWriter rewrites each shard into the server's
  storage, one import job per shard polled to *Completed*, index, flush, count check).

Both are timed from nothing to a flushed, counted collection with the same index; vectors/s = N / seconds.
Without ``--uri`` the embedded standalone server of the PyPI package ``milvus`` is started in a temporary
folder by ``--server-python`` (an interpreter that has it, e.g. ``.venv-milvus/bin/python``; see .ci/run).

    python benchmarks/bulk.py                                  # 1M vectors, dim 256
    python benchmarks/bulk.py --rows 200000 --server-python .venv-milvus/bin/python
    python benchmarks/bulk.py --insert-rows 200000             # 1M by bulk import, the insert path on 200k
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from _common import current_rss_mb, machine
from ingest import make_data, write_shards

from deepfeat.connectors import BulkStaging, IndexSpec, bulk_import_shards, connect, load_shards

_SERVER = textwrap.dedent("""
    import sys
    from milvus import MilvusServer
    server = MilvusServer()
    server.set_base_dir(sys.argv[1])
    server.start()
    print(server.listen_port, flush=True)
    sys.stdin.read()
    server.stop()
""")


@contextmanager
def embedded_server(python: str, base: Path) -> Iterator[tuple[str, Path]]:
    """(URI, folder the server reads) of an embedded standalone Milvus started by ``python``."""
    proc = subprocess.Popen([python, "-c", _SERVER, str(base)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdin is not None
    port = proc.stdout.readline().strip()
    if not port.isdigit():
        proc.kill()
        raise SystemExit(f"the embedded Milvus server did not start (got {port!r}); is 'milvus' installed in {python}?")
    try:
        yield f"http://127.0.0.1:{port}", base / "data"
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def given_server(uri: str, staging: str | None) -> Iterator[tuple[str, Path]]:
    """A running server named by ``--uri`` and the folder it reads (``--staging``)."""
    if staging is None:
        raise SystemExit("with --uri, give --staging: a folder the server reads at the same absolute path")
    yield uri, Path(staging)


def _first_shards(shards: Path, rows: int | None, shard_size: int, total: int) -> tuple[Path, int]:
    """The folder the insert path loads and its row count: all shards, or links to the first ``rows`` worth."""
    if rows is None or rows >= total:
        return shards, total
    n = max(1, -(-rows // shard_size))
    sub = shards.parent / "insert-shards"
    sub.mkdir()
    for part in sorted(shards.glob("part-*.parquet"))[:n]:
        (sub / part.name).symlink_to(part)
    return sub, min(total, n * shard_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000, help="vectors (default 1000000)")
    parser.add_argument("--dim", type=int, default=256, help="vector dim (default 256)")
    parser.add_argument("--shard-size", type=int, default=100_000, help="rows per Parquet shard (default 100000)")
    parser.add_argument("--batch", type=int, default=5_000, help="rows per upsert of the insert path (default 5000)")
    parser.add_argument("--index", default="IVF_FLAT:nlist=1024", help="index of both collections")
    parser.add_argument("--uri", default=None, help="a running server (then --staging: a folder it reads)")
    parser.add_argument("--staging", default=None, help="with --uri: a folder the server reads at the same path")
    parser.add_argument("--server-python", default=".venv-milvus/bin/python",
                        help="interpreter with the PyPI 'milvus' package (default .venv-milvus/bin/python)")
    parser.add_argument("--skip-insert", action="store_true", help="time the bulk path only")
    parser.add_argument("--insert-rows", type=int, default=None,
                        help="time the insert path on the first N rows only (whole shards; its rate barely depends "
                             "on N): a 1M-row run then takes ~20 min on 2 cores instead of ~45")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pymilvus").setLevel(logging.WARNING)  # BulkWriter logs every buffer flush at INFO
    import pymilvus

    index = IndexSpec.parse(args.index)
    work = Path(tempfile.mkdtemp(prefix="deepfeat-bulk-"))
    try:
        t0 = time.perf_counter()
        vectors, meta = make_data(args.rows, args.dim)
        write_shards(work / "shards", vectors, meta, args.shard_size)
        del vectors, meta
        shard_mb = sum(f.stat().st_size for f in (work / "shards").glob("*.parquet")) / 2**20
        print(f"shards: {args.rows} x dim {args.dim} in {time.perf_counter() - t0:.0f}s ({shard_mb:.0f} MB)")
        server = (given_server(args.uri, args.staging) if args.uri
                  else embedded_server(args.server_python, work / "server"))
        with server as (uri, staging_dir):
            conn = connect(uri)
            version = conn.client.get_server_version()
            results: dict[str, float] = {}
            staging = BulkStaging(local_dir=str(Path(staging_dir) / "deepfeat-bench"))
            start = time.perf_counter()
            bulk = bulk_import_shards(conn, "bench_bulk", work / "shards", staging=staging, index=index,
                                      state_path=work / "bulk.json", poll_interval=0.5, timeout=7200, progress=False)
            results["bulk"] = args.rows / (time.perf_counter() - start)
            assert bulk.verified and bulk.final_count == args.rows, bulk
            conn.client.drop_collection("bench_bulk")
            if not args.skip_insert:
                insert_dir, insert_rows = _first_shards(work / "shards", args.insert_rows, args.shard_size, args.rows)
                start = time.perf_counter()
                ins = load_shards(conn, "bench_insert", insert_dir, index=index, batch_rows=args.batch,
                                  state_path=work / "insert.json", progress=False)
                results["insert"] = insert_rows / (time.perf_counter() - start)
                assert ins.verified and ins.final_count == insert_rows, ins
                conn.client.drop_collection("bench_insert")
            conn.close()
        print(f"bulk: {args.rows} vectors x dim {args.dim}, index {index.index_type}, Milvus {version}, "
              f"pymilvus {pymilvus.__version__}, {machine()}; benchmark RSS {current_rss_mb():.0f} MB")
        for name, rate in results.items():
            rows = args.rows if name == "bulk" else insert_rows
            print(f"  {name:<7} {rate:9.0f} vectors/s  ({rows / rate:.0f} s for {rows} vectors)")
        if "insert" in results:
            print(f"  bulk / insert = {results['bulk'] / results['insert']:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
