"""Embedding throughput on Ray Data against the local path, on the same machine, in one run.

(l) ``local``: :func:`deepfeat.finetune.inference.embed.embed_to_parquet`, JPEG files -> Parquet shards,
    ``--num-workers`` DataLoader workers (``auto``: none on 2 cores, where the model already uses them all).
(r) ``ray``: :func:`deepfeat.finetune.inference.distributed.embed_with_ray` on a local Ray cluster of this
    machine's cores (started once, before any timing, as a cluster is up before a job is sent): CPU tasks
    read, hash, decode and preprocess for an actor pool of one actor per GPU; without GPUs, one single-threaded
    actor per core reads and embeds its own batches (``actor_layout``); the driver writes the same shards.

Both write one shard per batch, so each shard's modification time marks the moment its batch was done.
Two rates are printed per path: over the whole call (for Ray this includes starting the actor: a new
process that imports torch and receives the bundle, a cost paid once per job) and the steady rate
between the first and the last shard written (what a long job runs at). The goal (issue 18: Ray >= 0.8x
the local path on 2 cores) is checked on the steady rate; the whole-call ratio is printed beside it. The
two paths are alternated ``--repeats`` times and ratios taken within each repeat (medians reported).

    python benchmarks/embed_ray.py                          # CPU, 224 px, Lite0 with ImageNet weights
    python benchmarks/embed_ray.py --n 96 --repeats 2       # a quick look on a small shared machine
    python benchmarks/embed_ray.py --concurrency 1 --decode-tasks  # the CPU layout before 2026-12-07
    python benchmarks/embed_ray.py --device cuda --n 4096 --batch-size 256   # one GPU actor per GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from _common import goal_mark, machine, median, spread, table, write_jpegs

from deepfeat.finetune.inference.distributed import actor_layout, embed_with_ray, import_ray
from deepfeat.finetune.inference.embed import EmbedResult, auto_num_workers, embed_to_parquet
from deepfeat.finetune.inference.shards import read_shards
from deepfeat.finetune.models.bundle import ModelBundle, export_bundle
from deepfeat.finetune.models.model import build_embedding_model

GOAL_RAY_VS_LOCAL_CPU = 0.8


def steady_rate(result: EmbedResult) -> float:
    """Images/s between the first and the last shard written (one shard per batch)."""
    times = sorted(p.stat().st_mtime for p in result.shards)
    if len(times) < 3:
        return float("nan")
    first_batch = len(read_shards(result.shards[0])[0]) if result.shards else 0
    return (result.n_embedded - first_batch) / max(times[-1] - times[0], 1e-9)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet", help="imagenet (installed package), a local file, or none")
    parser.add_argument("--image-size", type=int, default=224, help="network input size (px)")
    parser.add_argument("--source-size", type=int, default=256, help="side of the JPEG files written (px)")
    parser.add_argument("--n", type=int, default=256, help="images per pass")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", default="auto", help="DataLoader workers of the local path, or auto")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="Ray actors (default: one per GPU, else one single-threaded actor per core)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each CPU actor")
    parser.add_argument("--decode-tasks", action="store_true",
                        help="decode in CPU tasks that feed the actors (the GPU layout) on CPU actors too; "
                             "--concurrency 1 --decode-tasks is the CPU layout before 2026-12-07")
    parser.add_argument("--repeats", type=int, default=3, help="alternated repeats; medians are reported")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (local path; Ray actors take GPUs if any)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here; run without --device for the CPU figures")
    workers = auto_num_workers(device) if args.num_workers == "auto" else int(args.num_workers)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="deepfeat-bench-ray-"))
    ray = import_ray()
    try:
        return _run(args, ray, device, workers, work)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, ray: Any, device: torch.device, workers: int, work: Path) -> dict[str, Any]:
    print(f"machine: {machine()}")
    t0 = time.perf_counter()
    paths = write_jpegs(work / "images", args.n, args.source_size)
    records = pd.DataFrame({"id": [p.name for p in paths], "path": [str(p) for p in paths], "label": "x"})
    model = build_embedding_model(args.backbone, args.weights, image_size=args.image_size)
    bundle = ModelBundle.load(export_bundle(model, work / "bundle", torchscript=False, onnx=False), device="cpu")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    res = ray.cluster_resources()
    layout = actor_layout(res.get("CPU", 0), res.get("GPU", 0), concurrency=args.concurrency, threads=args.threads,
                          decode_tasks=args.decode_tasks or None)
    print(f"setup {time.perf_counter() - t0:.0f}s: {args.n} JPEGs of {args.source_size} px, {args.backbone} at "
          f"{args.image_size} px, batch {args.batch_size}; local: {workers} DataLoader worker(s) on {device}; "
          f"ray: {res.get('CPU', 0):.0f} CPUs, {res.get('GPU', 0):.0f} GPUs, {layout}")

    rates: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {"whole call": [], "steady": []}
    for rep in range(args.repeats):
        got: dict[str, EmbedResult] = {}
        for name in (["local", "ray"] if rep % 2 == 0 else ["ray", "local"]):
            out = work / f"run-{rep}" / name
            if name == "local":
                got[name] = embed_to_parquet(bundle, records, out, shard_size=args.batch_size,
                                             batch_size=args.batch_size, num_workers=workers, device=str(device),
                                             progress=False)
            else:
                got[name] = embed_with_ray(bundle, records, out, shard_size=args.batch_size,
                                           batch_size=args.batch_size, concurrency=args.concurrency,
                                           threads=args.threads, decode_tasks=args.decode_tasks or None,
                                           progress=False)
            if got[name].n_embedded != args.n:
                raise SystemExit(f"{name} embedded {got[name].n_embedded} of {args.n} images")
        for name, res in got.items():
            rates.setdefault(f"{name} whole call", []).append(res.images_per_second)
            rates.setdefault(f"{name} steady", []).append(steady_rate(res))
        ratios["whole call"].append(got["ray"].images_per_second / got["local"].images_per_second)
        ratios["steady"].append(steady_rate(got["ray"]) / steady_rate(got["local"]))
        print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(
            f"{k} {r.images_per_second:.1f} img/s whole call ({r.seconds:.1f}s), {steady_rate(r):.1f} steady"
            for k, r in got.items()), flush=True)

    last = work / f"run-{args.repeats - 1}"
    rows_l, vecs_l, _ = read_shards(last / "local")
    rows_r, vecs_r, _ = read_shards(last / "ray")
    by_id = dict(zip(rows_l["id"], vecs_l, strict=True))
    ref = np.stack([by_id[i] for i in rows_r["id"]])
    cos = np.sum(ref * vecs_r, axis=1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(vecs_r, axis=1)
    print()
    print(table(["path", "images/s, whole call", "images/s, steady"],
                [[name, spread(rates[f"{name} whole call"]), spread(rates[f"{name} steady"])]
                 for name in ("local", "ray")]))
    print()
    goal = None if device.type == "cuda" else GOAL_RAY_VS_LOCAL_CPU
    print(table(["ray / local (median of per-repeat ratios)", "ratio", "goal"],
                [["steady", f"{median(ratios['steady']):.2f}x",
                  goal_mark(median(ratios["steady"]), goal) if goal else "(report images/s per GPU)"],
                 ["whole call (Ray: actor start-up included)", f"{median(ratios['whole call']):.2f}x", ""]]))
    print(f"note: Ray vs local vectors: cosine min {cos.min():.6f} over {len(cos)} images")
    result = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "rates": rates,
              "ratios": ratios, "cosine_min": float(cos.min())}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
