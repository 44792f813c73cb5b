"""Search: latency (p50/p95), QPS and recall@10 of FLAT vs an ANN index in Milvus, on real embeddings.

The vectors are real: EfficientNet-Lite0 (ImageNet weights) embeddings of Fashion-MNIST images
(``/usr/share/datasets/fashion-mnist``, Debian package ``dataset-fashion-mnist``) at ``--image-size``
px, projected to ``--dim`` dimensions by PCA (what ``EmbeddingModel.init_head_pca`` does for a linear
head; ``--dim 0`` keeps the backbone's 1280) and L2-normalised (COSINE). ``--real`` of them come from
the training split (the gallery); the queries are ``--queries`` embeddings of *test-split* images,
which are not in the collection. **Sizes above ``--real`` are filled with perturbed copies** of the
real vectors (Gaussian noise of ``--noise`` times the typical distance to the nearest real neighbour,
renormalised): they keep the distribution's shape, but they are not images.

Every collection is created and filled through the deepfeat connector (``load_embeddings``, which
sends the index build parameters nested and checks them) in Milvus Lite (``--uri``: a local
``.db``; an ``http://`` server works too), and searched with ``search_vectors``. Recall@10 is measured
against exact search (NumPy brute force over the same vectors), so FLAT's recall is 1.0 up to ties.
Latency is per request: ``--query-batch`` queries in one request, and single queries (nq = 1).

    python benchmarks/search.py                                   # 10k and 100k, FLAT vs HNSW
    python benchmarks/search.py --sizes 10000 100000 1000000 --index HNSW IVF_FLAT
    python benchmarks/search.py --uri http://localhost:19530      # a Milvus server
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from _common import machine, peak_rss_mb, table

TOP_K = 10
BUILD_PARAMS: dict[str, dict[str, Any]] = {
    "FLAT": {},
    "HNSW": {"M": 16, "efConstruction": 200},
    "IVF_FLAT": {"nlist": 1024},
    "IVF_SQ8": {"nlist": 1024},
}
SEARCH_PARAMS: dict[str, dict[str, Any]] = {
    "FLAT": {},
    "HNSW": {"ef": 64},
    "IVF_FLAT": {"nprobe": 32},
    "IVF_SQ8": {"nprobe": 32},
}


# --------------------------------------------------------------------------------------------------
# real embeddings


def embed_fashion_mnist(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """Backbone features (float32) of ``--real`` train images and ``--queries`` test images, cached."""
    cache = args.cache_dir / f"fmnist-{args.backbone}-{args.image_size}px-{args.real}-{args.queries}.npz"
    if cache.is_file():
        data = np.load(cache)
        print(f"embeddings: read from {cache}")
        return data["gallery"], data["queries"]
    import torch

    from deepfeat.finetune.data.readers import read_fashion_mnist
    from deepfeat.finetune.inference.embed import iter_embeddings
    from deepfeat.finetune.models.bundle import ModelBundle, export_bundle
    from deepfeat.finetune.models.model import build_embedding_model

    records = read_fashion_mnist(args.data)
    train = records[records["split"] == "train"].iloc[: args.real]
    test = records[records["split"] == "test"].iloc[: args.queries]
    if len(train) < args.real or len(test) < args.queries:
        raise SystemExit(f"Fashion-MNIST has {len(train)} train / {len(test)} test images; lower --real/--queries")
    model = build_embedding_model(args.backbone, args.weights, head="none", image_size=args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = ModelBundle.load(export_bundle(model, Path(tmp) / "bundle", torchscript=False, onnx=False))
    start = time.perf_counter()
    out = []
    for part in (train, test):
        vectors = [v for _, v in iter_embeddings(bundle, part, batch_size=256, num_workers=args.num_workers)]
        out.append(np.concatenate(vectors))
    seconds = time.perf_counter() - start
    print(
        f"embeddings: {len(train) + len(test)} Fashion-MNIST images with {args.backbone} at {args.image_size} px "
        f"in {seconds:.0f}s ({(len(train) + len(test)) / seconds:.0f} img/s, {torch.get_num_threads()} threads)"
    )
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(cache, gallery=out[0], queries=out[1])
    return out[0], out[1]


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def project(gallery: np.ndarray, queries: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """PCA of the (normalised) gallery features to ``dim`` dims, as a PCA-initialised linear head; L2-normalised."""
    g, q = normalise(gallery), normalise(queries)
    if dim <= 0 or dim >= g.shape[1]:
        return g, q
    mean = g.mean(0)
    _, _, vt = np.linalg.svd(g - mean, full_matrices=False)
    w = vt[:dim].T
    return normalise((g - mean) @ w), normalise((q - mean) @ w)


def grow(real: np.ndarray, size: int, noise: float, seed: int) -> np.ndarray:
    """``real`` followed by perturbed, renormalised copies of it up to ``size`` rows."""
    if size <= len(real):
        return real[:size]
    rng = np.random.default_rng(seed)
    sample = real[rng.choice(len(real), size=min(len(real), 2000), replace=False)]
    second = np.partition(sample @ real.T, -2, axis=1)[:, -2]  # [:, -1] is the vector itself
    nn_dist = np.sqrt(np.maximum(0.0, 2 - 2 * second))
    sigma = noise * float(np.median(nn_dist)) / np.sqrt(real.shape[1])
    parts = [real]
    n_extra = size - len(real)
    for start in range(0, n_extra, 50_000):
        n = min(50_000, n_extra - start)
        base = real[rng.integers(0, len(real), size=n)]
        parts.append(normalise(base + rng.normal(0.0, sigma, size=base.shape).astype(np.float32)))
    return np.concatenate(parts)


def exact_top_k(gallery: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Indices of the exact top-k by inner product (= cosine on normalised vectors), best first."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 256):
        scores = queries[start : start + 256] @ gallery.T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[start : start + 256] = np.take_along_axis(top, order, axis=1)
    return out


# --------------------------------------------------------------------------------------------------
# Milvus


def _batches(vectors: np.ndarray, size: int) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    for start in range(0, len(vectors), size):
        ids = [f"v{i:08d}" for i in range(start, min(start + size, len(vectors)))]
        yield pd.DataFrame({"id": ids}), vectors[start : start + len(ids)]


def fill(conn: Any, name: str, vectors: np.ndarray, index: str, fingerprint: dict[str, Any]) -> float:
    """Create ``name`` with ``index`` and load ``vectors`` through the connector; seconds (insert + load)."""
    from deepfeat.connectors import IndexSpec, drop_collection, load_embeddings

    if conn.has_collection(name):
        drop_collection(conn, name)
    start = time.perf_counter()
    load_embeddings(
        conn,
        name,
        _batches(vectors, 5000),
        bundle=fingerprint,
        index=IndexSpec(index, BUILD_PARAMS[index]),  # type: ignore[arg-type]
        progress=False,
        verify=False,
    )
    conn.ensure_loaded(name)
    return time.perf_counter() - start


def settle(conn: Any, name: str, uri: str | None, timeout: float = 900.0) -> float:
    """Wait until the index covers every row; seconds waited.

    Milvus Lite 3 builds the index of flushed segments, and compacts them, in a background thread:
    until that is done, searches brute-force the unindexed segments and compete with the build (the
    first measurement of an index would be neither the index nor exact search). Its only wait is
    internal (``Collection._wait_for_bg``), reached through the in-process server; a server is polled
    with ``describe_index`` instead.
    """
    start = time.perf_counter()
    if uri is None or not uri.startswith(("http://", "https://", "tcp://", "grpc://", "unix:")):
        try:
            from milvus_lite.server_manager import server_manager_instance

            servers = server_manager_instance._servers
            entry = servers.get(os.path.abspath(uri or conn.uri))
            if entry is None and len(servers) == 1:
                entry = next(iter(servers.values()))
            if entry is None:
                raise LookupError(f"no in-process Milvus Lite server for {uri or conn.uri!r}")
            db = entry[1]
            db.get_collection(name)._wait_for_bg(timeout=timeout)
            return time.perf_counter() - start
        except Exception as exc:  # internals moved: fall back to polling
            print(f"note: cannot wait for Milvus Lite's background index build ({exc!r}); polling describe_index")
    while time.perf_counter() - start < timeout:
        desc = conn.client.describe_index(name, "vector")
        if int(desc.get("pending_index_rows", 0) or 0) == 0 and str(desc.get("state", "Finished")) == "Finished":
            break
        time.sleep(1.0)
    return time.perf_counter() - start


def timed_search(
    conn: Any, name: str, queries: np.ndarray, index: str, nq: int, keys: dict[str, int]
) -> tuple[list[float], np.ndarray]:
    """Search in requests of ``nq`` queries: per-request latencies (s) and the top-k row indices."""
    from deepfeat.connectors import search_vectors

    latencies = []
    found = np.full((len(queries), TOP_K), -1, dtype=np.int64)
    for start in range(0, len(queries), nq):
        chunk = queries[start : start + nq]
        t = time.perf_counter()
        hits = search_vectors(
            conn, name, chunk, top_k=TOP_K, output_fields=[], search_params=SEARCH_PARAMS[index], batch_size=nq
        )
        latencies.append(time.perf_counter() - t)
        for i, row in enumerate(hits):
            found[start + i, : len(row)] = [keys[h["pk"]] for h in row]
    return latencies, found


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--index", nargs="+", default=["HNSW"], choices=[k for k in BUILD_PARAMS if k != "FLAT"])
    parser.add_argument("--real", type=int, default=20_000, help="real (train-split) embeddings in the gallery")
    parser.add_argument("--queries", type=int, default=500, help="query embeddings (test split, not in the gallery)")
    parser.add_argument("--query-batch", type=int, default=100, help="queries per request (batched mode)")
    parser.add_argument("--single", type=int, default=100, help="queries sent one per request (0: skip)")
    parser.add_argument("--dim", type=int, default=256, help="PCA dims (0: the backbone's 1280)")
    parser.add_argument("--noise", type=float, default=0.5, help="noise of the copies, x nearest-neighbour distance")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "deepfeat-bench")
    parser.add_argument("--uri", default=None, help="Milvus URI (default: a Milvus Lite .db in a temp dir)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from deepfeat.connectors import connect

    print(f"machine: {machine()}")
    gallery_raw, queries_raw = embed_fashion_mnist(args)
    real, queries = project(gallery_raw, queries_raw, args.dim)
    dim = real.shape[1]
    fingerprint = {
        "name": "bench",
        "bundle_id": f"bench-{args.backbone}-{args.image_size}px-{dim}d",
        "embedding_dim": dim,
        "metric": "COSINE",
        "preprocessing": {},
    }
    work = Path(tempfile.mkdtemp(prefix="deepfeat-bench-search-"))
    conn = connect(args.uri or str(work / "bench.db"))
    print(f"Milvus: {conn.display_uri} ({conn.server_version()}); {dim}-d COSINE vectors, {len(queries)} queries")
    rows: list[dict[str, Any]] = []
    try:
        for size in args.sizes:
            vectors = grow(real, size, args.noise, seed=size)
            truth = exact_top_k(vectors, queries, TOP_K)
            from deepfeat.connectors.schema import primary_keys

            keys = {pk: i for i, pk in enumerate(primary_keys([f"v{i:08d}" for i in range(size)]))}
            for index in ["FLAT", *args.index]:
                name = f"bench_{index.lower()}_{size}"
                load_s = fill(conn, name, vectors, index, fingerprint)
                load_s += settle(conn, name, args.uri)
                timed_search(conn, name, queries[: args.query_batch], index, args.query_batch, keys)  # warm-up
                lat, found = timed_search(conn, name, queries, index, args.query_batch, keys)
                single = timed_search(conn, name, queries[: args.single], index, 1, keys)[0] if args.single else []
                row = {
                    "size": size,
                    "real": min(size, len(real)),
                    "index": index,
                    "load_s": load_s,
                    "p50_ms": 1e3 * float(np.percentile(lat, 50)),
                    "p95_ms": 1e3 * float(np.percentile(lat, 95)),
                    "qps": len(queries) / sum(lat),
                    "single_p50_ms": 1e3 * float(np.percentile(single, 50)) if single else float("nan"),
                    "single_p95_ms": 1e3 * float(np.percentile(single, 95)) if single else float("nan"),
                    "recall_at_10": recall_at_k(found, truth),
                }
                rows.append(row)
                print(
                    f"{size:>8} {index:<9} load {load_s:6.1f}s  batch p50 {row['p50_ms']:7.1f} ms  "
                    f"p95 {row['p95_ms']:7.1f} ms  {row['qps']:7.0f} QPS  single p50 {row['single_p50_ms']:6.1f} ms  "
                    f"recall@10 {row['recall_at_10']:.3f}",
                    flush=True,
                )
                if args.uri is None:
                    from deepfeat.connectors import drop_collection

                    drop_collection(conn, name)  # keep the Lite .db small
    finally:
        conn.close()
        if args.uri is None:
            conn.release_lite()
            shutil.rmtree(work, ignore_errors=True)
    _report(rows, args)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2
            )
        )
    return rows


def _report(rows: Sequence[dict[str, Any]], args: argparse.Namespace) -> None:
    flat = {r["size"]: r for r in rows if r["index"] == "FLAT"}
    out = []
    for r in rows:
        base = flat[r["size"]]
        out.append(
            [
                f"{r['size']:,} ({r['real']:,} real)",
                f"{r['index']} {BUILD_PARAMS[r['index']] or ''} {SEARCH_PARAMS[r['index']] or ''}".strip(),
                f"{r['load_s']:.0f}",
                f"{r['p50_ms']:.1f} / {r['p95_ms']:.1f}",
                f"{r['qps']:.0f}",
                f"{r['qps'] / base['qps']:.2f}x",
                f"{r['single_p50_ms']:.1f} / {r['single_p95_ms']:.1f}",
                f"{r['recall_at_10']:.3f}",
            ]
        )
    print()
    print(
        table(
            [
                "vectors",
                "index (build, search params)",
                "load + index s",
                f"p50 / p95 ms, nq={args.query_batch}",
                "QPS",
                "QPS vs FLAT",
                "p50 / p95 ms, nq=1",
                "recall@10",
            ],
            out,
        )
    )
    print(f"peak RSS of this process: {peak_rss_mb():.0f} MiB")


if __name__ == "__main__":
    main()
