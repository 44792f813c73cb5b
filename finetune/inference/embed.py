"""Embedding records with a model bundle: batched, with DataLoader workers, streamed to Parquet shards.

Decoding overlaps with the forward pass (workers decode and preprocess the next batches while the
model runs), images that fail to decode are reported and skipped (or stop the run with
``on_error='fail'``), and every shard is written to a temporary name and renamed, so no reader ever
sees a half-written shard. No Lightning here: the Milvus connector embeds through this module too.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from deepfeat.finetune.data.dataset import RecordDataset, SkipReport, collate_skipping_errors, record_source
from deepfeat.finetune.data.images import DEFAULT_MAX_PIXELS, content_hash, load_image
from deepfeat.finetune.data.transforms import build_transforms
from deepfeat.finetune.errors import DataError, DeepfeatError, ImageDecodeError
from deepfeat.finetune.inference import device_decode
from deepfeat.finetune.inference.device_decode import DevicePreprocess, encoded_item, jpeg_for_device
from deepfeat.finetune.inference.runtime import (
    Precision,
    Runtime,
    auto_num_workers,
    cpu_has_native_bf16,
    resolve_precision,
    resolve_runtime,
)
from deepfeat.finetune.inference.shards import ShardWriter, read_shards
from deepfeat.finetune.models.bundle import ModelBundle

log = logging.getLogger(__name__)

Decode = Literal["auto", "cpu", "device"]
#: where :func:`iter_embeddings` decodes JPEG files (``--decode`` of ``deepfeat embed``)
DECODE_CHOICES: tuple[str, ...] = ("auto", "cpu", "device")


class HashingDataset(RecordDataset):
    """A :class:`RecordDataset` that also computes each record's ``content_hash`` in the worker.

    Hashing used to run in the main process after each forward pass, re-reading every file there: time on
    the critical path of the process that drives the model (on a GPU, a large share of it). In the worker
    the file is still in the page cache from decoding, and the hash overlaps with the forward pass.
    """

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        if "error" not in item:
            try:
                item["content_hash"] = content_hash(record_source(self.records.iloc[index], self.root))
            except (OSError, DeepfeatError):
                item["content_hash"] = ""
        return item


class _EncodedDataset(HashingDataset):
    """For ``decode="device"``: JPEG files come back as their bytes (decoded on the device in the main
    process); every other record is decoded and preprocessed here, as by :class:`HashingDataset`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # plain lists, read per item without pandas' row access (tens of microseconds an image)
        self._paths = self.records["path"].tolist() if "path" in self.records else None
        self._in_memory = self.records["image"].notna().tolist() if "image" in self.records else None

    def __getitem__(self, index: int) -> dict[str, Any]:
        data = orientation = None
        if self._paths is not None and not (self._in_memory is not None and self._in_memory[index]):
            path = Path(str(self._paths[index]))
            if self.root is not None and not path.is_absolute():
                path = Path(self.root) / path
            try:  # not a regular file (a folder, a pipe: never opened), a broken link: the CPU path says so
                data = path.read_bytes() if path.is_file() else None
            except OSError:
                data = None
            orientation = jpeg_for_device(data, DEFAULT_MAX_PIXELS) if data is not None else None
        if data is not None and orientation is not None:
            return encoded_item(data, index, int(self.labels[index]), orientation)
        return super().__getitem__(index)


def _collate(items: list[dict[str, Any]], channels_last: bool = False) -> dict[str, Any]:
    """:func:`collate_skipping_errors` plus the content hashes; with ``channels_last`` the image batch is
    built in that memory layout (in the worker), so the main process, which runs the model, does not
    spend a transposing copy of every batch on it (a few per cent of a CPU run)."""
    encoded = [it for it in items if "encoded" in it]
    if encoded:
        items = [it for it in items if "encoded" not in it]
    good = [it for it in items if "error" not in it]
    if not (channels_last and good):
        batch = collate_skipping_errors(items)
    else:
        first = good[0]["image"]
        images = torch.empty((len(good), *first.shape), dtype=first.dtype, memory_format=torch.channels_last)
        for i, it in enumerate(good):
            images[i].copy_(it["image"])  # a (C, H, W) view of HWC pixels: a straight copy
        batch = {
            "image": images,
            "label": torch.tensor([it["label"] for it in good], dtype=torch.long),
            "index": torch.tensor([it["index"] for it in good], dtype=torch.long),
            "errors": [(int(it["index"]), str(it["error"])) for it in items if "error" in it],
        }
    batch["content_hash"] = [str(it["content_hash"]) for it in good]
    # JPEG bytes for the device decoder, packed into one buffer and the per-image fields into a few
    # flat objects: the main process, which also drives the GPU, unpickles a handful of objects per
    # batch instead of a thousand
    sizes = [len(it["encoded"]) for it in encoded]
    packed = bytearray(sum(sizes))
    offset = 0
    for it, size in zip(encoded, sizes, strict=True):
        packed[offset : offset + size] = it["encoded"]
        offset += size
    batch["encoded"] = torch.frombuffer(packed, dtype=torch.uint8) if encoded else None
    batch["encoded_sizes"] = sizes
    batch["encoded_index"] = [int(it["index"]) for it in encoded]
    batch["encoded_digest"] = b"".join(it["digest"] for it in encoded)  # 32 bytes each
    batch["encoded_orientation"] = bytes(int(it["orientation"]) for it in encoded)
    return batch


def _init_worker(worker_id: int) -> None:
    # Not cv2.setNumThreads(1) here: called in a forked worker whose parent already used OpenCV's
    # thread pool, it can deadlock (seen: the whole embed hung in the test suite). Workers resize
    # small images; torch already runs them with one thread.
    return None


_COMPILED: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = weakref.WeakKeyDictionary()


#: ``--precision`` choices as ``autocast`` booleans (``benchmarks/embed.py``; :func:`iter_embeddings` also takes the
#: choice itself)
PRECISION_AUTOCAST: dict[str, bool | None] = {"auto": None, "fp32": False, "bf16": True}


def resolve_autocast(device: torch.device, autocast: bool | None) -> bool:
    """The bf16 autocast decision for ``device``: :func:`~deepfeat.finetune.inference.runtime.resolve_precision`
    under its older name and argument order (``benchmarks/embed.py`` uses it)."""
    return resolve_precision(autocast, device=device)


def compiled_model(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(model)``, once per model object, so repeated calls reuse the compiled graphs."""
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model)  # type: ignore[assignment]
    return _COMPILED[model]


@dataclass
class _InFlight:
    """A batch whose forward pass was launched; on CUDA its vectors are still being copied to the host."""

    index: np.ndarray
    hashes: list[str]
    vectors: torch.Tensor
    done: torch.cuda.Event | None


def iter_embeddings(bundle: ModelBundle, records: pd.DataFrame, *, batch_size: int = 64,
                    num_workers: int | str | None = None, on_error: Literal["skip", "fail"] = "skip",
                    report: SkipReport | None = None, root: str | Path | None = None,
                    device: str | torch.device | None = None, channels_last: bool = True,
                    autocast: bool | Precision | None = None, progress: bool = False, compile: bool = False,
                    decode: Decode = "auto") -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    """Embed ``records`` and yield ``(rows, vectors)`` per batch.

    ``rows`` are the batch's records (in input order, failed ones removed) with a ``content_hash``
    column added; ``vectors`` is float32 (len(rows), dim). With ``on_error='fail'`` the first image
    that does not decode raises :class:`ImageDecodeError`; with ``skip`` it goes into ``report``.

    Workers decode, preprocess and hash the next batches while the model runs. On CUDA the input
    comes from pinned memory, the forward pass runs under bf16 autocast, and the vectors of a batch are
    copied back while the next batch is already being computed. ``compile`` runs the model through
    ``torch.compile`` (worth it for long runs: compiling takes a minute or more). ``autocast`` runs the
    forward pass under bf16 autocast (``True``/``"bf16"``; ``False``/``"fp32"`` keeps float32); on a CPU with
    native bf16 (see :func:`~deepfeat.finetune.inference.runtime.cpu_has_native_bf16`) it is about 2-4x faster,
    with vectors within 1e-3 cosine of float32.

    ``device``, ``num_workers`` and ``autocast`` follow the one runtime rule
    (:mod:`deepfeat.finetune.inference.runtime`): the argument > ``$DEEPFEAT_DEVICE`` /
    ``$DEEPFEAT_NUM_WORKERS`` / ``$DEEPFEAT_PRECISION`` > where the bundle's model already is (the device)
    > the default (CUDA when available; the workers of
    :func:`~deepfeat.finetune.inference.runtime.auto_num_workers`; bf16 on CUDA only). ``None`` and
    ``"auto"`` count as not given.

    ``decode`` says where JPEG files are decoded: ``"cpu"`` in the workers (with the bundle's
    OpenCV preprocessing), ``"device"`` on ``device`` by ``torchvision.io.decode_jpeg`` (nvJPEG on
    CUDA) with torch resizing there, the workers only reading bytes (see
    :mod:`deepfeat.finetune.inference.device_decode`); ``"auto"`` is ``device`` on CUDA and ``cpu`` elsewhere.
    Other formats, and JPEGs the device decoder rejects, always take the CPU path.

    The arguments and the runtime are checked when this is called, before the first batch is asked for.

    Raises:
        DataError: a bad ``on_error``, ``decode``, device, worker count or precision (argument or environment).
    """
    runtime = _checked_runtime(bundle, on_error, decode, device, num_workers, autocast)
    return _embed_batches(bundle, records, runtime, batch_size=batch_size, on_error=on_error, report=report,
                          root=root, channels_last=channels_last, progress=progress, compile=compile, decode=decode)


def _checked_runtime(bundle: ModelBundle, on_error: str, decode: str, device: str | torch.device | None,
                     num_workers: int | str | None, autocast: bool | Precision | None) -> Runtime:
    """The arguments of an embedding checked, and its device, workers and precision by the runtime rule."""
    if on_error not in ("skip", "fail"):
        raise DataError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    if decode not in DECODE_CHOICES:
        raise DataError(f"decode must be one of {list(DECODE_CHOICES)}, got {decode!r}")
    runtime = resolve_runtime(device, num_workers, autocast, model=bundle.model)
    log.info("embedding on %s with %d DataLoader worker(s), %s", runtime.device, runtime.num_workers,
             "bf16 autocast" if runtime.autocast else "float32")
    return runtime


def _embed_batches(bundle: ModelBundle, records: pd.DataFrame, runtime: Runtime, *, batch_size: int, on_error: str,
                   report: SkipReport | None, root: str | Path | None, channels_last: bool, progress: bool,
                   compile: bool, decode: Decode) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    """The batches of :func:`iter_embeddings`, on the device, workers and precision of ``runtime``.

    Long because it is one streaming generator that keeps a batch in flight on the GPU: ``stage`` and ``finish``
    share the side stream, progress bar and records, and the pending batch must be yielded before a decode error
    is raised, so the loop state would otherwise have to be threaded through helpers.
    """
    records = records.reset_index(drop=True)
    dev, workers, use_autocast = runtime.device, runtime.num_workers, runtime.autocast
    model = bundle.model.to(dev).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = compiled_model(model)
    cuda = dev.type == "cuda"
    transform = build_transforms(bundle.preprocessing, preset="none", train=False)
    on_device = decode == "device" or (decode == "auto" and cuda)
    dataset = (_EncodedDataset if on_device else HashingDataset)(records, transform, class_to_idx={}, root=root)
    prep = DevicePreprocess(bundle.preprocessing, dev) if on_device else None
    loader_kw: dict[str, Any] = {}
    if workers > 0:
        loader_kw.update(prefetch_factor=4, persistent_workers=False, worker_init_fn=_init_worker)
    loader: DataLoader[dict[str, Any]] = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                                    num_workers=workers,
                                                    collate_fn=functools.partial(_collate, channels_last=channels_last),
                                                    pin_memory=cuda, **loader_kw)
    bar = tqdm(total=len(records), unit="img", desc="embed", disable=not progress)

    def finish(job: _InFlight) -> tuple[pd.DataFrame, np.ndarray]:
        if job.done is not None:
            job.done.synchronize()
        vectors = job.vectors.numpy()
        order = np.argsort(job.index, kind="stable")  # rows in input order, whichever path decoded them
        index, vectors = job.index[order], vectors[order]
        hashes = [job.hashes[i] for i in order]
        if not np.isfinite(vectors).all():
            bad = int((~np.isfinite(vectors).all(axis=1)).sum())
            raise DeepfeatError(f"the model produced {bad} non-finite embeddings in one batch; the bundle's "
                                f"weights are damaged or the input is out of range. Nothing was written "
                                f"for this batch")
        rows = records.iloc[index].copy()
        rows["content_hash"] = hashes
        bar.update(len(rows))
        return rows, np.ascontiguousarray(vectors, dtype=np.float32)

    side = torch.cuda.Stream(device=dev) if cuda and on_device else None

    def stage(batch: dict[str, Any]) -> _Staged:
        """Everything before the forward pass: on CUDA with device decoding this runs one batch ahead,
        in a thread and on its own stream, so nvJPEG and the resize overlap the previous forward."""
        errors = list(batch["errors"])
        indices = batch["index"].tolist()
        hashes = list(batch["content_hash"])
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            parts = [] if batch["image"] is None else [batch["image"].to(dev, non_blocking=True)]
            if batch["encoded"] is not None and prep is not None:  # only _EncodedDataset sends bytes
                images, more = _decode_encoded(batch, dev, transform, errors,
                                               lambda i: str(record_source(records.iloc[i], root)))
                if more:
                    parts.append(torch.stack([t for _, _, t in more]).to(dev))
                    indices += [i for i, _, _ in more]
                    hashes += [h for _, h, _ in more]
                if images:
                    parts.append(prep([t for _, _, t in images], channels_last=channels_last))
                    indices += [i for i, _, _ in images]
                    hashes += [h for _, h, _ in images]
            x = None if not parts else parts[0] if len(parts) == 1 else torch.cat(parts)
            ready = None
            if side is not None and x is not None:
                ready = torch.cuda.Event()
                ready.record(side)
        return _Staged(errors, indices, hashes, x, ready)

    in_flight: _InFlight | None = None
    try:
        for staged in _run_ahead(iter(loader), stage, threaded=side is not None):
            errors, indices, hashes = staged.errors, staged.indices, staged.hashes
            for index, message in errors:
                rid = str(records.at[index, "id"])
                if on_error == "fail":
                    if in_flight is not None:  # the batches before the bad image still come out first
                        job, in_flight = in_flight, None
                        yield finish(job)
                    raise ImageDecodeError(rid, f"{message} (run with --on-error skip to skip bad images)")
                # each skipped image is named (logged) even without a report (recipe run, evaluate)
                (report if report is not None else SkipReport()).add(
                    rid, str(records.at[index, "path"]) if "path" in records else "", message)
            bar.update(len(errors))
            if staged.x is None:
                continue
            x = staged.x
            if staged.ready is not None:
                torch.cuda.current_stream(dev).wait_event(staged.ready)
                x.record_stream(torch.cuda.current_stream(dev))  # made on the side stream, used on this one
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_autocast):
                out = model(x).float()
            done = None
            if cuda:
                host = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
                host.copy_(out, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
                out = host
            else:
                out = out.cpu()
            job = _InFlight(np.asarray(indices, dtype=np.int64), hashes, out, done)
            if in_flight is not None:
                previous, in_flight = in_flight, None
                yield finish(previous)
            if cuda:
                in_flight = job  # yielded once the next batch is queued on the GPU
            else:
                yield finish(job)
        if in_flight is not None:
            job, in_flight = in_flight, None
            yield finish(job)
    finally:
        bar.close()


@dataclass
class _Staged:
    """A batch ready for the forward pass: its decode errors, record positions, hashes and input."""

    errors: list[tuple[int, str]]
    indices: list[int]
    hashes: list[str]
    x: torch.Tensor | None
    ready: torch.cuda.Event | None


_T = TypeVar("_T")
_END = object()


def _run_ahead(batches: Iterator[dict[str, Any]], stage: Callable[[dict[str, Any]], _T], *,
               threaded: bool, depth: int = 2) -> Iterator[_T]:
    """``stage(batch)`` for each batch, in order; with ``threaded``, computed up to ``depth`` batches ahead
    in a background thread (torch and nvJPEG release the GIL, so it overlaps the caller's work).
    An exception in the thread is raised here; closing the generator stops the thread."""
    if not threaded:
        for batch in batches:
            yield stage(batch)
        return
    results: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any, exc: BaseException | None = None) -> bool:
        while not stop.is_set():
            try:
                results.put((item, exc), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for batch in batches:
                if not put(stage(batch)):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            put(None, exc)

    thread = threading.Thread(target=work, name="deepfeat-embed-stage", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = results.get()
            if exc is not None:
                raise exc
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=60)


def _decode_encoded(batch: dict[str, Any], dev: torch.device, transform: Any, errors: list[tuple[int, str]],
                    source_of: Callable[[int], str]) -> tuple[list[tuple[int, str, torch.Tensor]],
                                                              list[tuple[int, str, torch.Tensor]]]:
    """Decode a batch's JPEG bytes on ``dev``: ``(index, hash, uint8 image on dev)`` per image, and
    ``(index, hash, preprocessed CPU tensor)`` for those the device decoder rejected but Pillow reads.
    Images neither can decode are appended to ``errors``."""
    images: list[tuple[int, str, torch.Tensor]] = []
    fallback: list[tuple[int, str, torch.Tensor]] = []
    datas = list(torch.split(batch["encoded"], batch["encoded_sizes"]))
    # through the module: looked up at call time, so a wrapper put there (a test counting decodes) is used
    decoded = device_decode.decode_on_device(datas, dev, list(batch["encoded_orientation"]))
    raw = batch["encoded_digest"]
    for k, (data, index, image) in enumerate(zip(datas, batch["encoded_index"], decoded, strict=True)):
        digest = raw[32 * k : 32 * k + 32].hex()
        if image is not None:
            images.append((index, digest, image))
            continue
        try:
            fallback.append((index, digest, transform(image=load_image(data.numpy().tobytes()))["image"]))
        except ImageDecodeError as exc:  # worded as the worker path words it, with the file's path
            errors.append((index, str(ImageDecodeError(source_of(index), exc.reason))))
    if fallback:
        log.info("%d JPEG(s) of a batch were rejected by the device decoder and decoded on the CPU", len(fallback))
    return images, fallback


@dataclass
class EmbedResult:
    """What ``embed_to_parquet`` did."""

    out_dir: Path
    shards: list[Path]
    n_embedded: int
    n_skipped: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        """Throughput over the whole run."""
        return (self.n_embedded + self.n_skipped) / max(self.seconds, 1e-9)


def embed_to_parquet(bundle: ModelBundle, records: pd.DataFrame, out_dir: str | Path, *, shard_size: int = 50_000,
                     batch_size: int = 64, num_workers: int | str | None = None,
                     on_error: Literal["skip", "fail"] = "skip", root: str | Path | None = None,
                     device: str | torch.device | None = None, progress: bool = True, compile: bool = False,
                     autocast: bool | Precision | None = None, decode: Decode = "auto") -> EmbedResult:
    """Embed ``records`` into Parquet shards ``part-NNNNN.parquet`` under ``out_dir``.

    Resumable: shards already complete (same bundle fingerprint) are kept and their records skipped,
    so an interrupted run continues where it stopped. Memory stays at one shard of vectors.
    ``compile`` runs the model through ``torch.compile``; ``autocast`` switches bf16 autocast; ``device``,
    ``num_workers`` and ``autocast`` follow the one runtime rule (see :func:`iter_embeddings`).
    """
    records = records.reset_index(drop=True)
    start = time.perf_counter()
    runtime = _checked_runtime(bundle, on_error, decode, device, num_workers, autocast)  # before anything is written
    writer = ShardWriter(out_dir, bundle.fingerprint(), shard_size=shard_size)
    todo = records[~records["id"].astype(str).isin(writer.done_ids)]
    report = SkipReport()
    for rows, vectors in _embed_batches(bundle, todo, runtime, batch_size=batch_size, on_error=on_error,
                                        report=report, root=root, channels_last=True, progress=progress,
                                        compile=compile, decode=decode):
        writer.add(rows, vectors)
    writer.close(report)
    seconds = time.perf_counter() - start
    log.info("embedded %d images into %s (%d skipped) in %.1fs", writer.n_written, writer.out, len(report), seconds)
    return EmbedResult(writer.out, writer.shards, writer.n_written, len(report), seconds)


# auto_num_workers and cpu_has_native_bf16 live in runtime.py; imported from here by tests and benchmarks
__all__ = [
    "DECODE_CHOICES",
    "PRECISION_AUTOCAST",
    "Decode",
    "EmbedResult",
    "HashingDataset",
    "auto_num_workers",
    "compiled_model",
    "cpu_has_native_bf16",
    "embed_to_parquet",
    "iter_embeddings",
    "read_shards",
    "resolve_autocast",
]
