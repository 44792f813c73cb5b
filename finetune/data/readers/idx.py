"""Fashion-MNIST (Xiao et al. 2017, https://arxiv.org/abs/1708.07747) from its idx ``.gz`` files as records.

The Debian package ``dataset-fashion-mnist`` installs the files offline in :data:`FASHION_MNIST_ROOT`.
"""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from deepfeat.finetune.data.contract import validate_records
from deepfeat.finetune.errors import DataError

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_ROOT", "read_fashion_mnist"]

logger = logging.getLogger(__name__)

#: Where the Debian package ``dataset-fashion-mnist`` installs its files.
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
#: Fashion-MNIST class names, by class index.
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def read_fashion_mnist(
    root: str | os.PathLike[str] = FASHION_MNIST_ROOT,
    *,
    subset: Literal["all", "train", "test"] = "all",
    limit_per_class: int | None = None,
) -> pd.DataFrame:
    """Read Fashion-MNIST (Xiao et al. 2017) from its idx ``.gz`` files into records.

    Images are ``(28, 28)`` uint8 arrays in the ``image`` column (no files are written), labels are
    the class names of :data:`FASHION_MNIST_CLASSES`, ids look like ``fmnist-train-000123`` (the
    index in the official file), ``split`` is the official ``train``/``test`` split and the metadata
    column ``class_index`` keeps the numeric label.

    Args:
        root: folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.
        subset: ``"train"`` (60,000 images), ``"test"`` (10,000) or ``"all"``.
        limit_per_class: keep only the first N images of each class in each subset (file order).

    Raises:
        DataError: the files are missing (install ``dataset-fashion-mnist``) or corrupt.
    """
    if subset not in ("all", "train", "test"):
        raise DataError(f"subset must be 'all', 'train' or 'test', got {subset!r}")
    if limit_per_class is not None and limit_per_class < 1:
        raise DataError(f"limit_per_class must be >= 1 or None, got {limit_per_class}")
    base = Path(root)
    wanted: list[Literal["train", "test"]] = ["train", "test"] if subset == "all" else [subset]
    frames = []
    for part in wanted:
        stem = "train" if part == "train" else "t10k"
        image_file = base / f"{stem}-images-idx3-ubyte.gz"
        label_file = base / f"{stem}-labels-idx1-ubyte.gz"
        for file in (image_file, label_file):
            if not file.is_file():
                raise DataError(
                    f"Fashion-MNIST file {str(file)!r} not found; install the data with "
                    "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or pass the folder "
                    "holding the idx .gz files as root"
                )
        images = _read_idx(image_file, magic=2051)
        labels = _read_idx(label_file, magic=2049)
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"Fashion-MNIST {part}: {images.shape[0]} images but {labels.shape[0]} labels; the files "
                "are corrupt, reinstall dataset-fashion-mnist"
            )
        if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"Fashion-MNIST {part}: label {int(labels.max())} out of range; files corrupt")
        index = np.arange(len(labels))
        if limit_per_class is not None:
            keep = np.concatenate([index[labels == c][:limit_per_class] for c in range(10)])
            index = np.sort(keep)
        frames.append(
            pd.DataFrame(
                {
                    "id": [f"fmnist-{part}-{i:06d}" for i in index],
                    "image": pd.Series(list(images[index]), dtype=object),
                    "label": [FASHION_MNIST_CLASSES[c] for c in labels[index]],
                    "split": part,
                    "class_index": labels[index].astype(np.int64),
                }
            )
        )
    df = pd.concat(frames, ignore_index=True)
    logger.info("read %d Fashion-MNIST image(s) (%s) from %s", len(df), subset, base)
    return validate_records(df, check_files=False)


def _read_idx(file: Path, *, magic: int) -> np.ndarray:
    try:
        with gzip.open(file, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {str(file)!r}: {exc}; reinstall dataset-fashion-mnist") from exc
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else -1
    if found != magic:
        raise DataError(
            f"{str(file)!r} is not an idx file (magic {found}, expected {magic}); corrupt download"
        )
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise DataError(
            f"{str(file)!r} holds {len(data) - offset} bytes of data, expected {expected} for shape {dims}; "
            "the file is truncated, reinstall dataset-fashion-mnist"
        )
    # a writable copy: torch.from_numpy warns about read-only arrays and in-place edits would fail
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims).copy()

