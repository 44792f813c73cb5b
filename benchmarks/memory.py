"""Memory: peak RSS of ``embed_to_parquet`` stays flat as the number of images grows.

For each N in ``--sizes`` a fresh child process embeds the first N of a folder of small synthetic
JPEGs (class patterns: stripes, checks and discs in random colours, with noise) into Parquet shards of
``--shard-size`` rows, and reports its peak resident set size (VmHWM), its RSS before embedding
(model loaded, records built) and the peak RSS of its DataLoader workers. Vectors are held for at
most one shard, so the peak should not grow with N: the ratio of the largest N's peak to the
smallest N's should be about 1. What does grow with N is the record table itself (a few hundred
bytes per row: ids and paths), which the caller passes in.

    python benchmarks/memory.py                        # N = 5,000 and 20,000
    python benchmarks/memory.py --sizes 5000 20000 100000 --shard-size 2000
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _common import current_rss_mb, machine, peak_rss_mb, table

GOAL_GROWTH = 1.10  # peak(largest N) / peak(smallest N) at most this


def write_patterns(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` small JPEGs of 10 pattern classes (skips files already there)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        path = folder / f"p-{i:07d}.jpg"
        kind = i % 10
        period = 3 + kind % 5
        if kind < 4:
            mask = ((xx + yy * (kind % 2)) // period) % 2
        elif kind < 7:
            mask = ((xx // period) + (yy // period)) % 2
        else:
            r = (xx - size / 2) ** 2 + (yy - size / 2) ** 2
            mask = (np.sqrt(r) // period) % 2
        colours = rng.integers(0, 256, size=(2, 3))
        image = np.where(mask[..., None] == 1, colours[0], colours[1]).astype(np.float32)
        image += rng.normal(0, 12, size=image.shape)
        if not path.exists():
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=90)


class _Sampler(threading.Thread):
    """Samples this process's RSS every ``interval`` seconds (for the curve; the peak comes from VmHWM)."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        start = time.perf_counter()
        while not self.stop.is_set():
            self.samples.append((time.perf_counter() - start, current_rss_mb()))
            self.stop.wait(self.interval)


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Embed the first ``args.child`` images and report memory (runs in its own process)."""
    import pandas as pd

    from deepfeat.finetune.inference.embed import embed_to_parquet
    from deepfeat.finetune.models.bundle import ModelBundle, export_bundle
    from deepfeat.finetune.models.model import build_embedding_model

    n = args.child
    paths = sorted(args.images.glob("p-*.jpg"))[:n]
    records = pd.DataFrame(
        {"id": [p.name for p in paths], "path": [str(p) for p in paths], "label": [str(i % 10) for i in range(n)]}
    )
    with tempfile.TemporaryDirectory() as tmp:
        model = build_embedding_model(args.backbone, args.weights, image_size=args.image_size)
        bundle = ModelBundle.load(export_bundle(model, Path(tmp) / "bundle", torchscript=False, onnx=False))
        before = current_rss_mb()
        sampler = _Sampler()
        sampler.start()
        start = time.perf_counter()
        result = embed_to_parquet(
            bundle,
            records,
            Path(tmp) / "out",
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            progress=False,
        )
        seconds = time.perf_counter() - start
        sampler.stop.set()
        sampler.join()
        shards = len(result.shards)
    rss = [r for _, r in sampler.samples]
    half = len(rss) // 2
    return {
        "n": n,
        "embedded": result.n_embedded,
        "shards": shards,
        "seconds": seconds,
        "rss_before_mb": before,
        "peak_rss_mb": peak_rss_mb(),
        "rss_first_half_max_mb": max(rss[:half] or rss),
        "rss_second_half_max_mb": max(rss[half:] or rss),
        "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "records_mb": float(records.memory_usage(deep=True).sum()) / 2**20,
    }


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[5_000, 20_000])
    parser.add_argument("--shard-size", type=int, default=1_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--source-size", type=int, default=48, help="side of the synthetic JPEGs (px)")
    parser.add_argument("--image-size", type=int, default=32, help="network input size (px)")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--images", type=Path, default=None, help="folder for the JPEGs (default: a temp dir)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.child is not None:
        print(json.dumps(child(args)))
        return []

    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.images or Path(tmp) / "images"
        t = time.perf_counter()
        write_patterns(folder, max(args.sizes), args.source_size)
        print(f"{max(args.sizes)} synthetic {args.source_size} px JPEGs in {time.perf_counter() - t:.0f}s")
        rows = []
        for n in sorted(args.sizes):
            cmd = [sys.executable, __file__, "--child", str(n), "--images", str(folder)]
            for flag in ("shard_size", "batch_size", "num_workers", "image_size", "backbone", "weights"):
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"child for N={n} failed:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"N={n}: peak {row['peak_rss_mb']:.0f} MiB (before embedding {row['rss_before_mb']:.0f}), "
                f"{row['embedded'] / row['seconds']:.0f} img/s, {row['shards']} shards",
                flush=True,
            )
    _report(rows, args)
    if args.json:
        payload = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
        args.json.write_text(json.dumps(payload, indent=2))
    return rows


def _report(rows: Sequence[dict[str, Any]], args: argparse.Namespace) -> None:
    print()
    print(
        table(
            [
                "images",
                "shards",
                "RSS before MiB",
                "peak RSS MiB",
                "max RSS 1st / 2nd half MiB",
                "worker peak MiB",
                "record table MiB",
                "images/s",
            ],
            [
                [
                    f"{r['n']:,}",
                    r["shards"],
                    f"{r['rss_before_mb']:.0f}",
                    f"{r['peak_rss_mb']:.0f}",
                    f"{r['rss_first_half_max_mb']:.0f} / {r['rss_second_half_max_mb']:.0f}",
                    f"{r['worker_peak_rss_mb']:.0f}",
                    f"{r['records_mb']:.1f}",
                    f"{r['embedded'] / r['seconds']:.0f}",
                ]
                for r in rows
            ],
        )
    )
    growth = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    print()
    print(
        f"peak RSS, N={rows[-1]['n']:,} / N={rows[0]['n']:,}: {growth:.3f}  "
        f"{'PASS' if growth <= GOAL_GROWTH else 'MISS'} (goal <= {GOAL_GROWTH}: flat; shard size {args.shard_size})"
    )


if __name__ == "__main__":
    main()
