"""Embedding throughput, JPEG files on disk to vectors in Parquet, as ratios against two baselines.

(a) ``naive``: the loop users write today, one image at a time (Pillow open, the bundle's own
    preprocessing, a forward pass with batch 1, append), as in the classic Keras per-image
    ``model.predict`` tutorial; the vectors are written to Parquet at the end.
(b) ``model-only``: the forward pass alone on pre-decoded, pre-processed tensors already in memory
    (on the device), at the same batch size and settings as (c): the ceiling for (c).
(c) ``deepfeat``: :func:`deepfeat.finetune.inference.embed.embed_to_parquet`, files -> Parquet shards, with
    DataLoader workers decoding while the model runs.
(d) ``device decode`` (with ``--gpu-decode``; on by default on CUDA): ``embed_to_parquet(decode="device")``,
    the library's default on CUDA: workers only read and hash the file bytes,
    ``torchvision.io.decode_jpeg(device=...)`` decodes the batch on the GPU (nvJPEG) and resize, crop
    and normalise run there too (:mod:`deepfeat.finetune.inference.device_decode`, OpenCV's filters as matrix
    products). The cosine of its vectors against (c)'s is printed with it.

The three (four) are alternated ``--repeats`` times; ratios are computed within each repeat and the
medians are reported. Beside images per second, images per CPU-second (this process and its reaped
DataLoader workers) are printed: on a shared machine they move less than wall-clock rates. The naive
loop is the most sensitive to other load: with batch 1 every layer is a tiny parallel region, and a
descheduled OpenMP thread stalls each one. On CUDA, (b), (c) and (d) use bf16 autocast and
channels_last; (c) uses pinned memory and overlaps each batch's copy back with the next forward.
Goals (issue 6): CPU (c)/(a) >= 5 and (c)/(b) >= 0.9; GPU (c)/(b) >= 0.6.

    python benchmarks/embed.py                        # CPU, 224 px, Lite0 with ImageNet weights
    python benchmarks/embed.py --n 512 --repeats 5 --num-workers 2
    python benchmarks/embed.py --device cuda --n 4096 --batch-size 256 --num-workers 8
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from _common import Clock, Measure, goal_mark, machine, median, spread, table, write_jpegs

from deepfeat.finetune.data.transforms import build_eval_transforms
from deepfeat.finetune.inference.embed import (
    PRECISION_AUTOCAST,
    compiled_model,
    embed_to_parquet,
    read_shards,
    resolve_autocast,
)
from deepfeat.finetune.inference.runtime import tune_cpu_allocator
from deepfeat.finetune.models.bundle import ModelBundle, export_bundle
from deepfeat.finetune.models.model import build_embedding_model

GOAL_VS_NAIVE_CPU = 5.0
GOAL_VS_MODEL_CPU = 0.9
GOAL_VS_MODEL_GPU = 0.6


@dataclass
class Result:
    """Images per second of each path, one value per repeat, and the ratios within each repeat."""

    rates: dict[str, list[float]] = field(default_factory=dict)
    ratios: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add_rate(self, name: str, value: float) -> None:
        self.rates.setdefault(name, []).append(value)

    def add_ratio(self, name: str, value: float) -> None:
        self.ratios.setdefault(name, []).append(value)


def make_bundle(backbone: str, weights: str, image_size: int, folder: Path, device: torch.device) -> ModelBundle:
    """A bundle of the backbone with the default (identity-initialised linear) head, as fine-tuning exports."""
    model = build_embedding_model(backbone, weights, image_size=image_size)
    path = export_bundle(model, folder / "bundle", torchscript=False, onnx=False)
    return ModelBundle.load(path, device=device)


def autocast_ctx(device: torch.device, bf16: bool) -> Any:
    """bf16 autocast when ``bf16`` (what iter_embeddings does with the same setting); else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_naive(paths: Sequence[Path], model: torch.nn.Module, bundle: ModelBundle, out: Path) -> Measure:
    """(a) One image at a time: open, preprocess, forward batch 1, append; Parquet at the end."""
    from PIL import Image

    transform = build_eval_transforms(bundle.preprocessing)
    device = next(model.parameters()).device
    with Clock() as clock:
        vectors = []
        for path in paths:
            image = np.asarray(Image.open(path).convert("RGB"))
            x = transform(image=image)["image"].unsqueeze(0).to(device)
            with torch.no_grad():
                vectors.append(model(x)[0].float().cpu().numpy())
        pd.DataFrame({"path": [str(p) for p in paths], "vector": vectors}).to_parquet(out)
    return clock.measure(len(paths))


def preprocess_all(
    paths: Sequence[Path],
    bundle: ModelBundle,
    batch_size: int,
    device: torch.device,
) -> list[torch.Tensor]:
    """Decode and preprocess every image once, into channels_last batches on ``device`` (for (b))."""
    from deepfeat.finetune.data.images import load_image

    transform = build_eval_transforms(bundle.preprocessing)
    tensors = [transform(image=load_image(p))["image"] for p in paths]
    batches = []
    for i in range(0, len(tensors), batch_size):
        x = torch.stack(tensors[i : i + batch_size]).to(device)
        batches.append(x.contiguous(memory_format=torch.channels_last))
    return batches


def run_model_only(
    batches: Sequence[torch.Tensor], model: torch.nn.Module, device: torch.device, bf16: bool
) -> Measure:
    """(b) The forward pass alone over pre-made batches (vectors brought back to host memory)."""
    sync(device)
    with Clock() as clock, torch.inference_mode(), autocast_ctx(device, bf16):
        for x in batches:
            model(x).float().cpu().numpy()
    return clock.measure(sum(len(b) for b in batches))


def run_deepfeat(
    bundle: ModelBundle,
    records: pd.DataFrame,
    out: Path,
    args: argparse.Namespace,
    device: torch.device,
    decode: str = "cpu",
) -> Measure:
    """(c) / (d) embed_to_parquet, files -> Parquet shards, JPEGs decoded in the workers (``cpu``) or on
    the device (``device``); timed over the whole call (worker start-up included)."""
    with Clock() as clock:
        result = embed_to_parquet(
            bundle,
            records,
            out,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=str(device),
            progress=False,
            compile=args.compile,
            autocast=args.bf16,
            decode=decode,  # type: ignore[arg-type]
        )
    if result.n_embedded != len(records):
        raise SystemExit(f"embed_to_parquet embedded {result.n_embedded} of {len(records)} images")
    return clock.measure(len(records))


def main(argv: Sequence[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet", help="imagenet (installed package), a local file, or none")
    parser.add_argument("--image-size", type=int, default=224, help="network input size (px)")
    parser.add_argument("--source-size", type=int, default=256, help="side of the JPEG files written (px)")
    parser.add_argument("--n", type=int, default=192, help="images per pass of (b), (c) and (d)")
    parser.add_argument("--naive-n", type=int, default=32, help="images per pass of the naive loop (a)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--num-workers",
        type=int,
        default=1,
        help="DataLoader workers of (c) and (d) (the machine's cores are shared with the model)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="alternated repeats; medians are reported")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the model of (b), (c), (d) (not of the naive loop)"
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="of (b), (c), (d): auto = bf16 autocast on CUDA, float32 on CPU; bf16 on a CPU with AVX512-BF16/AMX "
        "(the naive loop (a) stays float32, as users run it)",
    )
    parser.add_argument(
        "--gpu-decode",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also measure (d), decode_jpeg on the device (default: on for CUDA)",
    )
    parser.add_argument("--skip-naive", action="store_true", help="leave out (a)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "--device cuda: no CUDA device is available here (torch.cuda.is_available() is False); "
            "the GPU figures need a machine with a GPU. Run without --device for the CPU figures"
        )
    gpu_decode = device.type == "cuda" if args.gpu_decode is None else args.gpu_decode
    args.bf16 = resolve_autocast(device, PRECISION_AUTOCAST[args.precision])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="deepfeat-bench-embed-"))
    try:
        return _run(args, device, gpu_decode, work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, device: torch.device, gpu_decode: bool, work: Path) -> Result:
    # one allocator for every path from the first repeat on (deepfeat's path would tune it when it starts,
    # and the other paths share the process)
    tune_cpu_allocator()
    print(f"machine: {machine()}")
    t0 = time.perf_counter()
    paths = write_jpegs(work / "images", args.n, args.source_size)
    records = pd.DataFrame({"id": [p.name for p in paths], "path": [str(p) for p in paths], "label": "x"})
    bundle = make_bundle(args.backbone, args.weights, args.image_size, work, device)
    naive_model = copy.deepcopy(bundle.model).to(device).to(memory_format=torch.contiguous_format).eval()
    model = bundle.model.to(device).eval().to(memory_format=torch.channels_last)
    if args.compile:
        # the very object embed_to_parquet(compile=True) uses, so it is compiled once, here
        model = compiled_model(model)
    batches = preprocess_all(paths, bundle, args.batch_size, device)
    # warm-up (oneDNN primitives, cuDNN autotune, compilation): every batch shape once, not timed
    with torch.inference_mode(), autocast_ctx(device, args.bf16):
        for shape in {tuple(b.shape) for b in batches}:
            model(next(b for b in batches if tuple(b.shape) == shape))
        naive_model(batches[0][:1].contiguous())
    print(
        f"setup {time.perf_counter() - t0:.0f}s: {args.n} JPEGs of {args.source_size} px, {args.backbone} at "
        f"{args.image_size} px, batch {args.batch_size}, {args.num_workers} worker(s), device {device}"
        f"{', compiled' if args.compile else ''}{', bf16 autocast' if args.bf16 else ', float32'}"
    )

    result = Result()
    for rep in range(args.repeats):
        out = work / f"run-{rep}"
        order = ["naive", "model", "deepfeat", "decode"]
        if rep % 2:
            order.reverse()  # alternate the order, so drifting load does not favour one side
        got: dict[str, Measure] = {}
        for name in order:
            if name == "naive" and not args.skip_naive:
                out.mkdir(parents=True, exist_ok=True)
                got[name] = run_naive(paths[: args.naive_n], naive_model, bundle, out / "naive.parquet")
            elif name == "model":
                got[name] = run_model_only(batches, model, device, args.bf16)
            elif name == "deepfeat":
                got[name] = run_deepfeat(bundle, records, out / "deepfeat", args, device)
            elif name == "decode" and gpu_decode:
                got[name] = run_deepfeat(bundle, records, out / "decode", args, device, decode="device")
        for name, m in got.items():
            result.add_rate(name, m.rate)
            result.add_rate(f"{name} per CPU-s", m.cpu_rate)
        for num, den in (("deepfeat", "naive"), ("deepfeat", "model"), ("decode", "model")):
            if num in got and den in got:
                result.add_ratio(f"{num}/{den}", got[num].rate / got[den].rate)
                result.add_ratio(f"{num}/{den} per CPU-s", got[num].cpu_rate / got[den].cpu_rate)
        print(
            f"repeat {rep + 1}/{args.repeats}: "
            + ", ".join(f"{k} {m.rate:.1f} img/s ({m.cpu_rate:.1f}/CPU-s)" for k, m in got.items()),
            flush=True,
        )
        if rep < args.repeats - 1:
            shutil.rmtree(out, ignore_errors=True)

    rows, vecs, _ = read_shards(work / f"run-{args.repeats - 1}" / "deepfeat")
    naive_file = work / f"run-{args.repeats - 1}" / "naive.parquet"
    if naive_file.is_file():
        naive = pd.read_parquet(naive_file)
        by_path = dict(zip(rows["path"], vecs, strict=True))
        ours = np.stack([by_path[p] for p in naive["path"]])
        cos = np.sum(ours * np.stack(naive["vector"].to_list()), axis=1)  # both are L2-normalised
        result.notes.append(
            f"(c) vs (a) vectors: cosine mean {cos.mean():.5f}, min {cos.min():.5f} "
            f"({'bf16' if args.bf16 else 'float32'} batched vs float32 one at a time)"
        )
    if gpu_decode:
        rows_d, vecs_d, _ = read_shards(work / f"run-{args.repeats - 1}" / "decode")
        by_id = dict(zip(rows_d["id"], vecs_d, strict=True))
        ref = np.stack([by_id[i] for i in rows["id"]])
        cos = np.sum(ref * vecs, axis=1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(vecs, axis=1)
        result.notes.append(
            f"(d) vs (c) vectors: cosine mean {cos.mean():.5f}, min {cos.min():.5f} (device decode and resize "
            f"vs the workers' Pillow + OpenCV preprocessing; bit-identical they are not)"
        )
    _report(result, args, device)
    if args.json:
        payload = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, **asdict(result)}
        args.json.write_text(json.dumps(payload, indent=2))
    return result


def _report(result: Result, args: argparse.Namespace, device: torch.device) -> None:
    labels = {
        "naive": "(a) naive loop, 1 image at a time",
        "model": f"(b) model-only forward, batch {args.batch_size}, pre-decoded",
        "deepfeat": f"(c) deepfeat embed_to_parquet, decode in {args.num_workers} worker(s)",
        "decode": f"(d) deepfeat, decode on the device, {args.num_workers} worker(s) reading",
    }
    rows = []
    for name, label in labels.items():
        if name in result.rates:
            rows.append([label, spread(result.rates[name]), spread(result.rates[f"{name} per CPU-s"])])
    print()
    print(table(["path", "images/s, median (min-max)", "images per CPU-second"], rows))
    print()
    gpu = device.type == "cuda"
    goal_model = GOAL_VS_MODEL_GPU if gpu else GOAL_VS_MODEL_CPU
    goals = {
        "deepfeat/naive": ("(c)/(a) vs naive loop", None if gpu else GOAL_VS_NAIVE_CPU),
        "deepfeat/model": ("(c)/(b) vs model-only", goal_model),
        "decode/model": ("(d)/(b) vs model-only", goal_model if gpu else None),
    }
    checks = []
    for key, (label, goal) in goals.items():
        if key in result.ratios:
            value = median(result.ratios[key])
            per_cpu = median(result.ratios[f"{key} per CPU-s"])
            mark = goal_mark(value, goal) if goal is not None else "(goal set for the other device)"
            checks.append([label, f"{value:.2f}x", f"{per_cpu:.2f}x", mark])
    print(table(["ratio (median of per-repeat ratios)", "wall-clock", "per CPU-second", "goal (wall-clock)"], checks))
    for note in result.notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
