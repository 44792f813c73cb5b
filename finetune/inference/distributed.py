"""Embedding on a Ray cluster (Ray Data), into the same shard contract as ``deepfeat embed``.

The job, as Ray Data's batch-inference shape has it:

1. the records still to embed (those not already in complete shards of ``out_dir``) become a dataset of
   small blocks: a position and the ``path`` (or in-memory ``image``) of each record, nothing else;
2. each image is read, its bytes hashed (``content_hash``), decoded and preprocessed with the very code of
   the local path (:class:`~deepfeat.finetune.inference.embed.HashingDataset`: Pillow / pydicom through
   :func:`~deepfeat.finetune.data.images.load_image`, then the bundle's own transforms), so bad images fail
   with the same messages and good ones give the same pixels: in CPU tasks that feed the GPU actors, or, on a
   cluster without GPUs, by each CPU actor for its own batches;
3. an actor pool embeds the batches, one bundle per actor (``num_gpus=1`` per actor where the cluster has
   GPUs; otherwise one single-threaded CPU actor per core; ``concurrency`` actors, see :func:`actor_layout`);
4. the driver receives the vectors as they stream out and writes them with the local path's
   :class:`~deepfeat.finetune.inference.shards.ShardWriter`: same columns, schema metadata, atomic
   ``part-NNNNN.parquet`` files and ``_report.json`` of skipped inputs. The metadata columns never travel
   through Ray: the driver joins them back by position.

Writing on the driver, not with ``Dataset.write_parquet`` on the workers, keeps the contract whole:
shards are only ever complete (temporary name, fsync, rename), the bundle fingerprint is in every
schema, and a run killed at any instant resumes by skipping the ids of the complete shards. What the
driver receives is small (``4 * dim`` bytes an image), so it is not the bottleneck of a GPU cluster.

Memory is bounded by Ray Data's streaming executor: a window of ``window`` batches of preprocessed
pixels in the object store (``resource_limits.object_store_memory``), one shard of vectors on the driver.
The image paths must be readable by every node (a shared file system), as the bundle travels with the job.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pickle
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from deepfeat.finetune.data.dataset import SkipReport
from deepfeat.finetune.data.transforms import build_transforms
from deepfeat.finetune.errors import DataError, DeepfeatError, ImageDecodeError, MissingExtraError
from deepfeat.finetune.inference.embed import EmbedResult, HashingDataset
from deepfeat.finetune.inference.runtime import Precision, resolve_precision, tune_cpu_allocator
from deepfeat.finetune.inference.shards import ShardWriter
from deepfeat.finetune.models.backbones import Preprocessing
from deepfeat.finetune.models.bundle import ModelBundle

log = logging.getLogger(__name__)

_POS = "_pos"
_IMAGE = "_image_pickle"


def import_ray() -> Any:
    """``import ray`` (with Ray Data), or the exact install command of the extra that provides it.

    Raises:
        MissingExtraError: Ray (or Ray Data's dependencies) is not installed.
    """
    try:
        import ray
        import ray.data  # Ray Data's own dependencies come with the extra, not with ray alone
    except ImportError as exc:
        raise MissingExtraError("ray[data]", "ray", "embedding on Ray (--engine ray)") from exc
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[Any]:
    """The connected ``ray`` module: an existing connection is used as it is, else ``ray.init(address)``
    connects (``"auto"``, ``"ray://head:10001"``) or, with no address, starts a local cluster; a connection
    made here is closed on the way out.

    Raises:
        MissingExtraError: Ray is not installed.
        DataError: no cluster at ``address``.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise DataError(
            f"cannot connect to a Ray cluster at {address!r}: {' '.join(str(exc).split())[:200]}; start one "
            f"('ray start --head'), pass its address (--address auto or ray://host:10001), or leave --address "
            f"out to start a local one"
        ) from exc
    try:
        yield ray
    finally:
        ray.shutdown()


@functools.lru_cache(maxsize=4)
def _transform(preprocessing: tuple[tuple[str, Any], ...]) -> Any:
    """The bundle's eval transforms, built once per worker process."""
    return build_transforms(Preprocessing.from_dict(dict(preprocessing)), preset="none", train=False)


def _freeze(value: Any) -> Any:
    """A hashable copy of a preprocessing dict's values (lists become tuples), for the transform cache."""
    return tuple(_freeze(v) for v in value) if isinstance(value, list | tuple) else value


def read_and_preprocess(batch: pd.DataFrame, *, preprocessing: tuple[tuple[str, Any], ...],
                        root: str | None) -> dict[str, np.ndarray]:
    """The CPU stage: read, hash, decode and preprocess a batch of records (positions and sources).

    Returns columns ``_pos``, ``content_hash``, ``error`` (empty when the image is good) and ``pixels``
    (float32 (n, 3, H, W); zeros where ``error`` is set), computed by :class:`HashingDataset`, the local path's
    worker code.
    """
    transform = _transform(preprocessing)
    if _IMAGE in batch:
        images: list[Any] = [None if v is None else pickle.loads(v) for v in batch[_IMAGE]]
        batch = batch.assign(image=pd.Series(images, index=batch.index, dtype=object))
    dataset = HashingDataset(batch, transform, class_to_idx={}, root=root)
    items = [dataset[i] for i in range(len(dataset))]
    shape = next((tuple(it["image"].shape) for it in items if "error" not in it), None)
    if shape is None:  # nothing decoded: any shape does; the embed stage skips these rows
        h, w = dict(preprocessing)["input_size"]
        shape = (3, int(h), int(w))
    pixels = np.zeros((len(items), *shape), dtype=np.float32)
    for i, it in enumerate(items):
        if "error" not in it:
            pixels[i] = it["image"].numpy()
    return {
        _POS: batch[_POS].to_numpy(dtype=np.int64),
        "content_hash": np.array([str(it.get("content_hash", "")) for it in items], dtype=object),
        "error": np.array([str(it.get("error", "")) for it in items], dtype=object),
        "pixels": pixels,
    }


@dataclass(frozen=True)
class ActorLayout:
    """How the embed stage uses a cluster: ``actors`` actors, each with ``gpus`` GPUs, ``cpus`` CPUs reserved
    and ``threads`` torch threads (CPU actors), fed by CPU tasks that decode (``decode_tasks``) or reading
    their own batches."""

    actors: int
    gpus: float
    cpus: float
    threads: int
    decode_tasks: bool = False

    @property
    def device(self) -> str:
        """``cuda`` for GPU actors, else ``cpu``."""
        return "cuda" if self.gpus else "cpu"


def actor_layout(cluster_cpus: float, cluster_gpus: float, *, concurrency: int | None = None,
                 num_gpus: float | None = None, threads: int | None = None,
                 decode_tasks: bool | None = None) -> ActorLayout:
    """The actor pool for a cluster of ``cluster_cpus`` CPUs and ``cluster_gpus`` GPUs.

    GPU actors (the default where the cluster has GPUs): one per GPU, no CPU reserved, every core left to the
    CPU tasks that decode for them. CPU actors (the default elsewhere): one per core, each running the model on
    a single torch thread and reading its own batches (:class:`ReadingEmbedder`), one CPU reserved each (a
    fraction where ``concurrency`` asks for more actors than CPUs). Measured on 2 cores
    (``benchmarks/embed_ray.py``, steady rates): one actor of two threads fed by decoding tasks runs at
    0.70-0.76x the local path, as whenever a decoding task or one of Ray's own processes takes a core, the
    other thread waits at every layer's barrier; two single-threaded actors run at 0.83-0.97x.
    ``threads`` defaults to the cluster's CPUs divided by the actors (an actor never takes more than its
    node's cores). An explicit ``num_gpus`` is taken as it is, even beyond what the cluster has now (an
    autoscaling cluster adds GPU nodes when actors wait for them). ``decode_tasks`` (default: for GPU actors
    only) feeds the actors from CPU tasks; CPU actors then reserve at most half of the cluster's CPUs between
    them, so that the decoding tasks can always be scheduled.
    """
    gpus = (1.0 if cluster_gpus else 0.0) if num_gpus is None else float(num_gpus)
    tasks = bool(gpus) if decode_tasks is None else decode_tasks
    cpus_total = max(float(cluster_cpus), 1.0)
    if gpus:
        actors = concurrency or max(1, int(cluster_gpus // gpus))
        return ActorLayout(actors=actors, gpus=gpus, cpus=0.0, threads=threads or 1, decode_tasks=tasks)
    actors = concurrency or max(1, int(cpus_total))
    share = cpus_total / 2 if tasks else cpus_total
    cpus = max(0.0001, int(min(1.0, share / actors) * 10_000) / 10_000)  # Ray's resolution: 1e-4
    return ActorLayout(actors=actors, gpus=0.0, cpus=cpus, threads=threads or max(1, int(cpus_total) // actors),
                       decode_tasks=tasks)


class BundleEmbedder:
    """The actor of the embed stage: holds one bundle on its device and embeds batches of pixels.

    Args:
        bundle: the model bundle (shipped to each actor once, through Ray's object store).
        device: ``cuda`` on a GPU actor, ``cpu`` otherwise.
        autocast: bf16 autocast, by the one runtime rule
            (:func:`~deepfeat.finetune.inference.runtime.resolve_precision`: the argument > ``$DEEPFEAT_PRECISION``
            > on CUDA only, as the local path). :func:`embed_with_ray` decides it on the driver and passes it.
        threads: torch intra-op threads of a CPU actor (``None``: the cores of its node divided by
            ``actors``); never more than its node's cores.
        actors: the size of the pool (to share the node's cores among CPU actors).
    """

    def __init__(self, bundle: ModelBundle, device: str, autocast: bool | Precision | None, threads: int | None,
                 actors: int) -> None:
        tune_cpu_allocator()
        self.device = torch.device(device)
        if self.device.type == "cpu":
            # Ray sets OMP_NUM_THREADS to the actor's CPU reservation (1): the model would run on one core
            cores = os.cpu_count() or 1
            torch.set_num_threads(min(threads, cores) if threads else max(1, cores // max(1, actors)))
        self.model = bundle.model.to(self.device).eval().to(memory_format=torch.channels_last)
        self.autocast = resolve_precision(autocast, device=self.device)
        self.dim = int(bundle.card.embedding_dim)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Add ``vector`` (float32 (n, dim); zeros for rows whose ``error`` is set), drop ``pixels``."""
        good = np.array([not e for e in batch["error"]], dtype=bool)
        vectors = np.zeros((len(good), self.dim), dtype=np.float32)
        if good.any():
            x = torch.from_numpy(np.array(batch["pixels"][good], dtype=np.float32))  # a writable copy
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                        enabled=self.autocast):
                vectors[good] = self.model(x).float().cpu().numpy()
        return {_POS: batch[_POS], "content_hash": batch["content_hash"], "error": batch["error"], "vector": vectors}


class ReadingEmbedder(BundleEmbedder):
    """A CPU actor that reads, hashes, decodes and preprocesses its own batches (:func:`read_and_preprocess`)
    before embedding them: on CPU nodes the decoding has no idle accelerator to overlap with, and the pixels
    then never travel through the object store.

    Args:
        preprocessing: the bundle's preprocessing, frozen (as :func:`read_and_preprocess` takes it).
        root: folder that relative paths are resolved against.
        **kwargs: those of :class:`BundleEmbedder`.
    """

    def __init__(self, *, preprocessing: tuple[tuple[str, Any], ...], root: str | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.preprocessing = preprocessing
        self.root = root

    def __call__(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:  # type: ignore[override]
        """Read and embed a batch of records (positions and sources)."""
        return super().__call__(read_and_preprocess(batch, preprocessing=self.preprocessing, root=self.root))


def _sources(todo: pd.DataFrame, block_rows: int) -> list[pd.DataFrame]:
    """What the CPU tasks need of each record (position, path, in-memory image), in blocks of ``block_rows``."""
    cols: dict[str, Any] = {_POS: np.arange(len(todo), dtype=np.int64), "id": todo["id"].astype(str).to_numpy(),
                            "label": ""}
    if "path" in todo:
        cols["path"] = [None if p is None or (isinstance(p, float) and np.isnan(p)) else str(p) for p in todo["path"]]
    if "image" in todo and todo["image"].notna().any():
        # pickled: a column mixing encoded bytes and arrays does not survive Arrow as it is (bytes come back as
        # 0-d numpy arrays); the CPU stage unpickles what the driver held, exactly
        cols[_IMAGE] = [None if v is None or (isinstance(v, float) and np.isnan(v)) else pickle.dumps(v)
                        for v in todo["image"]]
    frame = pd.DataFrame(cols)
    return [frame.iloc[i : i + block_rows].reset_index(drop=True) for i in range(0, len(frame), block_rows)]


def embed_with_ray(bundle: ModelBundle, records: pd.DataFrame, out_dir: str | Path, *, shard_size: int = 50_000,
                   batch_size: int = 64, on_error: Literal["skip", "fail"] = "skip",
                   root: str | Path | None = None, address: str | None = None, concurrency: int | None = None,
                   num_gpus: float | None = None, threads: int | None = None,
                   autocast: bool | Precision | None = None, window: int = 8, decode_tasks: bool | None = None,
                   progress: bool = True) -> EmbedResult:
    """Embed ``records`` on Ray Data into Parquet shards under ``out_dir``: the job of
    :func:`~deepfeat.finetune.inference.embed.embed_to_parquet`, with the same shards, report and resume.

    Args:
        bundle: the model bundle (its weights travel to every actor).
        records: the record table (``docs/contracts.md``); paths must be readable on every node.
        out_dir: the shard directory; complete shards already there (same bundle) are kept and their
            records skipped, so a killed run re-run with the same ``out_dir`` continues.
        shard_size: rows per shard.
        batch_size: images per batch of both stages.
        on_error: ``skip`` reports bad images in ``_report.json``; ``fail`` stops at the first one.
        root: folder that relative paths are resolved against (on every node).
        address: the Ray cluster (``"auto"``, ``"ray://head:10001"``); ``None`` uses the connection of
            this process (``ray.init`` done by the caller) or starts a local cluster.
        concurrency: actors in the pool (default: one per GPU of the cluster, else one single-threaded actor
            per CPU; see :func:`actor_layout`).
        num_gpus: GPUs per actor (default: 1 where the cluster has GPUs, else 0: CPU actors).
        threads: torch threads of a CPU actor (default: the cluster's CPUs divided by the actors).
        autocast: bf16 autocast (``True``/``"bf16"``, ``False``/``"fp32"``); not given (``None``, ``"auto"``):
            ``$DEEPFEAT_PRECISION``, else on GPU actors only. Decided here, on the driver, whose environment the
            actors of a remote cluster do not share.
        window: batches of preprocessed pixels the job may hold in the object store at once (at least two per
            actor).
        decode_tasks: read and decode in CPU tasks that feed the actors (``True``) or in the actors themselves
            (``False``); default: CPU tasks for GPU actors, the actors themselves on CPU (see
            :func:`actor_layout`).
        progress: show a progress bar (images).

    Raises:
        MissingExtraError: Ray is not installed (``pip install "deepfeat[ray]"``).
        DataError: ``out_dir`` holds shards of another bundle or damaged ones; bad arguments.
        ImageDecodeError: with ``on_error="fail"``, the first image that does not decode.
    """
    if on_error not in ("skip", "fail"):
        raise DataError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    for name, value in (("batch_size", batch_size), ("window", window), ("concurrency", concurrency or 1),
                        ("threads", threads or 1)):
        if value < 1:
            raise DataError(f"{name} must be at least 1, got {value}")
    start = time.perf_counter()
    records = records.reset_index(drop=True)
    writer = ShardWriter(out_dir, bundle.fingerprint(), shard_size=shard_size)
    todo = records[~records["id"].astype(str).isin(writer.done_ids)].reset_index(drop=True)
    report = SkipReport()
    if len(todo):
        with ray_session(address) as ray:
            _run(ray, bundle, todo, writer, report, batch_size=batch_size, on_error=on_error, root=root,
                 concurrency=concurrency, num_gpus=num_gpus, threads=threads, autocast=autocast, window=window,
                 decode_tasks=decode_tasks, progress=progress)
    writer.close(report)
    seconds = time.perf_counter() - start
    log.info("embedded %d images on Ray into %s (%d skipped) in %.1fs", writer.n_written, writer.out, len(report),
             seconds)
    return EmbedResult(writer.out, writer.shards, writer.n_written, len(report), seconds)


def _run(ray: Any, bundle: ModelBundle, todo: pd.DataFrame, writer: ShardWriter, report: SkipReport, *,
         batch_size: int, on_error: str, root: str | Path | None, concurrency: int | None, num_gpus: float | None,
         threads: int | None, autocast: bool | Precision | None, window: int, decode_tasks: bool | None,
         progress: bool) -> None:
    """Build the dataset, stream its batches into ``writer``; the skipped inputs go into ``report`` in input
    order (as the local path lists them), whatever order the batches came back in."""
    from ray.data import DataContext, ExecutionResources

    resources = ray.cluster_resources()
    layout = actor_layout(float(resources.get("CPU", 0)), float(resources.get("GPU", 0)), concurrency=concurrency,
                          num_gpus=num_gpus, threads=threads, decode_tasks=decode_tasks)
    device = layout.device
    use_autocast = resolve_precision(autocast, device=device)  # the driver's $DEEPFEAT_PRECISION, not the actors'
    prep = bundle.preprocessing
    frozen = tuple((k, _freeze(v)) for k, v in sorted(prep.to_dict().items()))
    h, w = prep.input_size
    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.execution_options.resource_limits)
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    window = max(window, 2 * layout.actors)  # a batch in work and one queued for each actor
    # the batch window: preprocessed pixels (float32) of `window` batches, the most the object store holds
    ctx.execution_options.resource_limits = ExecutionResources(object_store_memory=window * batch_size * 12 * h * w)
    log.info("Ray: %d %s actor(s) (%s), %s, batches of %d, a window of %d batches, %s", layout.actors,
             device.upper(), f"{layout.gpus:g} GPU each" if layout.gpus else
             f"{layout.threads} torch thread(s) and {layout.cpus:g} CPU reserved each",
             "fed by decoding CPU tasks" if layout.decode_tasks else "each reading its own batches", batch_size,
             window, "bf16 autocast" if use_autocast else "float32")
    bar = tqdm(total=len(todo), unit="img", desc="embed (ray)", disable=not progress)
    try:
        ds = ray.data.from_pandas(_sources(todo, batch_size))
        actor_kwargs = {"bundle": bundle, "device": device, "autocast": use_autocast, "threads": layout.threads,
                        "actors": layout.actors}
        reading = {"preprocessing": frozen, "root": None if root is None else str(root)}
        pool = {"batch_size": batch_size, "compute": ray.data.ActorPoolStrategy(size=layout.actors),
                "num_gpus": layout.gpus, "num_cpus": layout.cpus}
        if layout.decode_tasks:  # CPU tasks decode while the actors embed
            ds = ds.map_batches(read_and_preprocess, batch_format="pandas", batch_size=batch_size, num_cpus=0.5,
                                fn_kwargs=reading)
            ds = ds.map_batches(BundleEmbedder, batch_format="numpy", fn_constructor_kwargs=actor_kwargs, **pool)
        else:  # each CPU actor reads its own batches
            ds = ds.map_batches(ReadingEmbedder, batch_format="pandas",
                                fn_constructor_kwargs={**actor_kwargs, **reading}, **pool)
        skipped: dict[int, str] = {}
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=1):
            skipped.update(_write_batch(todo, batch, writer, on_error=on_error))
            bar.update(len(batch[_POS]))
        for p in sorted(skipped):
            report.add(str(todo.at[p, "id"]), str(todo.at[p, "path"]) if "path" in todo else "", skipped[p])
    finally:
        bar.close()
        ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.execution_options.resource_limits = saved


def _write_batch(todo: pd.DataFrame, batch: dict[str, np.ndarray], writer: ShardWriter, *,
                 on_error: str) -> dict[int, str]:
    """Join a batch's vectors to their records and hand them to ``writer``; returns its bad images (position ->
    reason), or raises on the first with ``on_error="fail"``."""
    pos = np.asarray(batch[_POS], dtype=np.int64)
    errors = [str(e) for e in batch["error"]]
    good = np.array([not e for e in errors], dtype=bool)
    bad = {int(p): message for p, message in zip(pos[~good], (e for e in errors if e), strict=True)}
    if bad and on_error == "fail":
        p = min(bad)
        raise ImageDecodeError(str(todo.at[p, "id"]), f"{bad[p]} (run with --on-error skip to skip bad images)")
    if not good.any():
        return bad
    vectors = np.ascontiguousarray(np.stack(list(batch["vector"][good])), dtype=np.float32)
    if not np.isfinite(vectors).all():
        n_bad = int((~np.isfinite(vectors).all(axis=1)).sum())
        raise DeepfeatError(f"the model produced {n_bad} non-finite embeddings in one batch; the bundle's weights "
                            f"are damaged or the input is out of range. Nothing was written for this batch")
    rows = todo.iloc[pos[good]].copy()
    rows["content_hash"] = [str(h) for h in batch["content_hash"][good]]
    writer.add(rows, vectors)
    return bad


__all__ = ["BundleEmbedder", "embed_with_ray", "import_ray", "ray_session", "read_and_preprocess"]
