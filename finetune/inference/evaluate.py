"""Off-the-shelf vs fine-tuned: retrieval metrics of several models on the same query/gallery split."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from deepfeat.finetune.data.dataset import RecordDataset, SkipReport, make_loader
from deepfeat.finetune.data.transforms import build_transforms
from deepfeat.finetune.errors import DataError
from deepfeat.finetune.inference.runtime import resolve_runtime
from deepfeat.finetune.metrics import retrieval_metrics_from_records
from deepfeat.finetune.models.model import EmbeddingModel, build_embedding_model

log = logging.getLogger(__name__)


@torch.inference_mode()
def embed_records(model: EmbeddingModel, records: pd.DataFrame, *, batch_size: int = 128,
                  num_workers: int | str | None = None, root: str | None = None, report: SkipReport | None = None,
                  device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Embed records with the model's own eval preprocessing.

    ``device`` and ``num_workers`` follow the one runtime rule (:mod:`deepfeat.finetune.inference.runtime`:
    argument > environment > the model's own device > default); the forward pass stays float32.

    Returns:
        ``(embeddings, kept)``: float32 (n_kept, dim) and the positions (into ``records``) that decoded.
    """
    if records.empty:  # not a decoding failure: there is nothing to decode
        raise DataError("the split to evaluate holds no records (0 images); choose a split that has images, or a "
                        "split mode that fills it (e.g. split_mode: by_class)")
    runtime = resolve_runtime(device, num_workers, "fp32", model=model)
    device, num_workers = runtime.device, runtime.num_workers
    records = records.reset_index(drop=True)
    model = model.to(device).eval()
    ds = RecordDataset(records, build_transforms(model.preprocessing, preset="none", train=False),
                       class_to_idx={}, root=root)
    out: list[np.ndarray] = []
    kept: list[np.ndarray] = []
    for batch in make_loader(ds, batch_size=batch_size, num_workers=num_workers):
        for index, message in batch["errors"]:  # each skipped image is named (logged), report or not
            (report if report is not None else SkipReport()).add(
                str(records.at[index, "id"]), str(records.at[index, "path"]) if "path" in records else "", message)
        if batch["image"] is None:
            continue
        out.append(model(batch["image"].to(device)).float().cpu().numpy())
        kept.append(batch["index"].numpy())
    if not out:
        raise DataError(f"none of the {len(records)} images of the split to evaluate could be decoded (each is named "
                        f"with its reason in the warnings above); fix or replace these files")
    return np.concatenate(out), np.concatenate(kept)


def off_the_shelf(model: EmbeddingModel, weights: str = "imagenet") -> EmbeddingModel:
    """The baseline every user already has: the same backbone's pooled pretrained features."""
    cfg = model.backbone.config()
    base = build_embedding_model(cfg["name"], weights, head="none", layers=cfg["layers"])
    base.backbone.preprocessing = model.preprocessing
    return base


def evaluate_models(models: Mapping[str, EmbeddingModel], records: pd.DataFrame, *, batch_size: int = 128,
                    num_workers: int | str | None = None, root: str | None = None, exclude_same_group: bool = False,
                    device: str | torch.device | None = None) -> dict[str, dict[str, Any]]:
    """Retrieval metrics of each model on ``records`` (one split, with is_query/is_gallery set); ``device``
    and ``num_workers`` as in :func:`embed_records`."""
    results: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        start = time.perf_counter()
        emb, kept = embed_records(model, records, batch_size=batch_size, num_workers=num_workers, root=root,
                                  device=device)
        rows = records.reset_index(drop=True).iloc[kept]
        metrics = retrieval_metrics_from_records(emb, rows, exclude_same_group=exclude_same_group)
        metrics["seconds"] = time.perf_counter() - start
        log.info("%s: %s", name, {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
        results[name] = metrics
    return results


def evaluation_header(source: str, split: str, records: pd.DataFrame) -> str:
    """One line naming what an evaluation table measures: the data, the split and its query/gallery counts.

    Args:
        source: the data as the user named it (a folder, a manifest, ``fashion-mnist``).
        split: the split evaluated (``val``, ``test``).
        records: that split's records, with ``is_query`` / ``is_gallery`` set.
    """
    n_queries = int(records["is_query"].astype(bool).sum()) if "is_query" in records else len(records)
    n_gallery = int(records["is_gallery"].astype(bool).sum()) if "is_gallery" in records else len(records)
    n_classes = int(records["label"].nunique()) if "label" in records else 0
    return (f"data {source!r}, split {split!r}: {n_queries:,} queries against {n_gallery:,} gallery images, "
            f"{n_classes} classes")


def training_data_warning(training: Mapping[str, Any], source: str, labels: Any) -> str | None:
    """Why a bundle may be evaluated on other data than it was trained on, or ``None`` when nothing says so.

    Args:
        training: the bundle card's ``training`` section (``data_source`` and ``classes_train`` when the export
            recorded them).
        source: the data the evaluation reads.
        labels: the evaluated records' labels.
    """
    trained_on = training.get("data_source")
    classes = {str(c) for c in training.get("classes_train") or ()}
    seen = {str(c) for c in labels}
    if classes and seen and not classes & seen:
        return (f"the bundle was trained on {trained_on or 'other data'!r}, whose classes share none with the "
                f"{len(seen)} classes of {source!r}; pass the data it was trained for with --data")
    if trained_on and trained_on != "<records>" and not _same_source(str(trained_on), source):
        return (f"the bundle's card says it was trained on {trained_on!r}, not {source!r}; the table measures "
                f"it on other data (pass --data to choose)")
    return None


def _same_source(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False
