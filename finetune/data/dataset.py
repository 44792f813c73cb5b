"""Datasets over the record table, and the Lightning data module for metric learning.

Bad images never become zero tensors: a sample that fails to decode comes back as an error item,
which the collate function separates from the batch; the caller (training, embedding) reports it and
goes on, or stops when the policy is ``fail``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from deepfeat.finetune.data.images import load_image
from deepfeat.finetune.errors import DataError, ImageDecodeError

log = logging.getLogger(__name__)

OnError = Literal["skip", "fail"]


@dataclass
class SkipReport:
    """Every input that was skipped, and why; written as JSON next to the outputs."""

    skipped: list[dict[str, str]] = field(default_factory=list)

    def add(self, record_id: str, source: str, reason: str) -> None:
        """Record one skipped input."""
        self.skipped.append({"id": record_id, "source": source, "reason": reason})
        log.warning("skipped %s (%s): %s", record_id, source, reason)

    def __len__(self) -> int:
        return len(self.skipped)

    def write(self, path: str | Path) -> Path:
        """Write the report as JSON (atomically) and return its path.

        Raises:
            DataError: the file cannot be written (disk full, no permission); no partial file is left.
        """
        p = Path(path)
        tmp = p.with_name(p.name + ".tmp")
        try:
            tmp.write_text(json.dumps({"n_skipped": len(self.skipped), "skipped": self.skipped}, indent=2,
                                      ensure_ascii=False))
            tmp.replace(p)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise DataError(f"cannot write the skip report {str(p)!r}: {exc.strerror or exc}; {len(self.skipped)} "
                            f"skipped input(s) are listed in the log. Free space and re-run") from exc
        return p


def record_source(row: pd.Series | dict[str, Any], root: str | Path | None = None) -> Any:
    """What ``load_image`` should read for one record: its path (resolved) or its in-memory image."""
    image = row.get("image") if hasattr(row, "get") else None
    if image is not None and not (isinstance(image, float) and np.isnan(image)):
        return image
    path = row.get("path")
    if path is None or (isinstance(path, float) and np.isnan(path)):
        raise DataError(f"record {row.get('id')!r} has neither 'path' nor 'image'")
    p = Path(str(path))
    if root is not None and not p.is_absolute():
        p = Path(root) / p
    return p


class RecordDataset(Dataset[dict[str, Any]]):
    """Images of a record table, decoded and transformed; labels as integer class indices.

    Args:
        records: the record table (see ``docs/contracts.md``).
        transform: a callable taking ``image=HxWx3 uint8`` and returning ``{"image": tensor}``
            (an albumentations ``Compose``).
        class_to_idx: label -> index; built from ``records`` when omitted (unknown labels get -1).
        root: folder that relative paths are resolved against.
    """

    def __init__(self, records: pd.DataFrame, transform: Callable[..., dict[str, Any]],
                 class_to_idx: dict[str, int] | None = None, root: str | Path | None = None) -> None:
        self.records = records.reset_index(drop=True)
        self.transform = transform
        self.root = root
        if class_to_idx is None:
            class_to_idx = {c: i for i, c in enumerate(sorted(self.records["label"].astype(str).unique()))}
        self.class_to_idx = class_to_idx
        self.labels = np.array([class_to_idx.get(str(v), -1) for v in self.records["label"]], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.records.iloc[index]
        try:
            source = record_source(row, self.root)
            image = load_image(source)
        except (ImageDecodeError, DataError) as exc:
            return {"error": str(exc), "index": index}
        tensor = self.transform(image=image)["image"]
        return {"image": tensor, "label": int(self.labels[index]), "index": index}


def collate_skipping_errors(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack good samples; keep failed ones aside as ``errors`` (index, message)."""
    good = [it for it in items if "error" not in it]
    errors = [(int(it["index"]), str(it["error"])) for it in items if "error" in it]
    if good:
        batch: dict[str, Any] = {
            "image": torch.stack([it["image"] for it in good]),
            "label": torch.tensor([it["label"] for it in good], dtype=torch.long),
            "index": torch.tensor([it["index"] for it in good], dtype=torch.long),
        }
    else:
        batch = {"image": None, "label": torch.zeros(0, dtype=torch.long), "index": torch.zeros(0, dtype=torch.long)}
    batch["errors"] = errors
    return batch


def _worker_init(worker_id: int) -> None:
    """Give each DataLoader worker its own augmentation stream (albumentations does not reseed forks)."""
    # deferred: transforms imports albumentations and OpenCV (seconds), and the connectors load this module
    # for the shard contract without ever building a transform
    from deepfeat.finetune.data.transforms import reseed_in_worker

    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info is not None else None
    if transform is not None and hasattr(transform, "transforms"):
        reseed_in_worker(transform)


def make_loader(dataset: RecordDataset, *, batch_size: int = 64, num_workers: int = 0, shuffle: bool = False,
                batch_sampler: Any = None, pin_memory: bool = False) -> DataLoader[dict[str, Any]]:
    """A DataLoader with the error-separating collate and sensible worker settings."""
    kw: dict[str, Any] = {"num_workers": num_workers, "collate_fn": collate_skipping_errors,
                          "pin_memory": pin_memory}
    if num_workers > 0:
        kw.update(persistent_workers=False, prefetch_factor=4, worker_init_fn=_worker_init)
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **kw)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, **kw)
