"""The full-network embedding (FNE): every layer's features, standardised and discretised.

Garcia-Gasulla et al. ("An Out-of-the-box Full-network Embedding for Convolutional Neural Networks",
arXiv:1705.07706; and "On the Behavior of Convolutional Nets for Feature Extraction", JAIR 61, 2018)
observe that a CNN feature's *presence* or *absence* for an image, relative to how that feature
usually behaves on the data at hand, carries most of its discriminative information, while its exact
magnitude is mostly noise. The embedding is built in three steps:

1. Spatial average pooling of every convolutional layer's activations (one value per channel), and
   concatenation over all the layers of the network: generic early features and task-specific late
   ones in one vector.
2. Feature standardisation: ``z = (x - mean) / std`` per feature, the mean and standard deviation
   measured on a reference set of the target domain (the training images). A feature that never
   varies on the reference set carries no information and becomes 0.
3. Feature discretisation to three values: ``-1`` if ``z < t_neg`` (the feature is unusually absent),
   ``1`` if ``z > t_pos`` (unusually present), ``0`` otherwise. The paper's thresholds are
   ``t_neg = -0.25`` and ``t_pos = 0.15``.

In deepfeat the embedding is an :class:`~deepfeat.finetune.models.model.EmbeddingModel` whose head is an
:class:`~deepfeat.finetune.models.heads.FNEHead` (``head="fne"``, in :mod:`deepfeat.finetune.models.heads`
with the other heads and re-exported here): the statistics and thresholds are buffers of the model, so they
travel in the model bundle's weights (and its hash), and query time uses exactly the statistics of
index time. Build one with :func:`build_fne_model`, measure the statistics with :func:`fit_statistics`.

Storage (:func:`fne_storage_report`): Milvus Lite stores the codes as ``FLOAT_VECTOR`` (COSINE, 4 bytes
a dimension). A Milvus server can hold the same ranking in ``INT8_VECTOR`` (:func:`to_int8`, COSINE,
1 byte a dimension) or in bits (:func:`to_presence_absence`, :func:`to_binary_code`: 2 bits a
dimension, with HAMMING distance equal to the L1 distance between the ternary codes).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from deepfeat.finetune.data.dataset import RecordDataset, make_loader
from deepfeat.finetune.data.transforms import build_transforms
from deepfeat.finetune.errors import DataError, ModelError
from deepfeat.finetune.models.backbones import DEFAULT_BACKBONE, Backbone, LayerSpec, create_backbone
from deepfeat.finetune.models.heads import DEFAULT_THRESHOLDS, FNEHead, FNEStatistics, RunningMoments
from deepfeat.finetune.models.model import EmbeddingModel

log = logging.getLogger(__name__)

StorageKind = Literal["float32", "int8", "binary"]


# ----------------------------------------------------------------------------------------------------
# features of many layers in one pass
# ----------------------------------------------------------------------------------------------------
def all_layers(backbone: Backbone) -> list[LayerSpec]:
    """Every intermediate layer of a timm backbone, plus ``"head"`` (the final pooled vector)."""
    # available_layers() runs a probe batch of one image: in training mode that fails in BatchNorm
    # and would move its running statistics, so the probe runs in eval mode.
    was_training = backbone.training
    backbone.eval()
    try:
        available = backbone.available_layers()
    finally:
        backbone.train(was_training)
    if not available:
        raise ModelError(
            f"{backbone.name!r} exposes no intermediate layers (torchvision models do not); "
            f"use the timm name of the same architecture (e.g. 'resnet50')"
        )
    return [*available, "head"]


def with_layers(backbone: Backbone, layers: Sequence[LayerSpec] | Literal["all"]) -> Backbone:
    """The same network (shared weights) reading features from ``layers`` (``"all"``: every layer)."""
    specs = all_layers(backbone) if isinstance(layers, str) and layers == "all" else list(layers)
    return Backbone(backbone.name, backbone.model, backbone.preprocessing, specs)


def layer_features(backbone: Backbone, x: torch.Tensor) -> list[torch.Tensor]:
    """The pooled features of each of ``backbone.layers`` for images ``x``, from one forward pass."""
    return backbone.layer_features(x)


def _image_batches(data: torch.Tensor | Iterable[Any], batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        for start in range(0, data.shape[0], batch_size):
            yield data[start : start + batch_size]
        return
    for batch in data:
        if isinstance(batch, Mapping):
            images = batch.get("image")
            if images is None:  # every image of this batch failed to decode (see collate_skipping_errors)
                continue
            yield images
        elif isinstance(batch, list | tuple):
            yield batch[0]
        else:
            yield batch


# ----------------------------------------------------------------------------------------------------
# building and fitting
# ----------------------------------------------------------------------------------------------------
def build_fne_model(
    backbone: str | Backbone = DEFAULT_BACKBONE,
    weights: str = "imagenet",
    *,
    layers: Sequence[LayerSpec] | Literal["all"] = "all",
    image_size: int | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    discretize: bool = True,
    normalize: bool = True,
) -> EmbeddingModel:
    """A full-network-embedding model: backbone features of ``layers`` -> :class:`FNEHead`.

    Args:
        backbone: a timm model name (see :func:`~deepfeat.finetune.models.backbones.create_backbone`) or an
            existing :class:`Backbone` (its weights are shared, not copied).
        weights: as in ``create_backbone`` (ignored when ``backbone`` is a ``Backbone``).
        layers: ``"all"`` (every intermediate layer and ``"head"``) or a list of layer specs.
        image_size: input size override (ignored when ``backbone`` is a ``Backbone``).
        thresholds: ``(t_neg, t_pos)`` of the discretisation.
        discretize: ternary codes (``True``) or standardised features only.
        normalize: L2-normalise the output, so that Milvus' COSINE (or IP) ranks by cosine similarity.

    The model must be fitted (:func:`fit_statistics`) before it embeds anything.
    """
    bb = (
        backbone
        if isinstance(backbone, Backbone)
        else create_backbone(backbone, weights, image_size=image_size)
    )
    bb = with_layers(bb, layers)
    return EmbeddingModel(
        bb,
        head="fne",
        normalize=normalize,
        head_options={"thresholds": list(thresholds), "discretize": discretize},
    )


def fne_head(model: EmbeddingModel) -> FNEHead:
    """The :class:`FNEHead` of ``model``, or a :class:`ModelError` naming the fix."""
    if not isinstance(model.head, FNEHead):
        raise ModelError(
            f"this model has head={model.head_type!r}, not a full-network embedding; build one "
            f"with deepfeat.finetune.models.fne.build_fne_model()"
        )
    return model.head


@torch.inference_mode()
def fit_statistics(
    model: EmbeddingModel,
    data: torch.Tensor | Iterable[Any],
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> FNEStatistics:
    """Measure the per-feature mean and standard deviation of ``model``'s backbone on a reference set.

    The reference set should be images of the target domain (the paper uses the training images),
    preprocessed with ``model.preprocessing``. Statistics are accumulated batch by batch in float64,
    so the set can be larger than memory.

    Args:
        model: an FNE model (:func:`build_fne_model`).
        data: a preprocessed image tensor ``(N, 3, H, W)``, or an iterable of such batches, of
            ``(images, ...)`` tuples, or of dict batches with an ``"image"`` key (a deepfeat loader).
        batch_size: batch size when ``data`` is a tensor.
        device: where to run the backbone; ``None`` keeps the model's device.

    Returns:
        How many images were used and how many features had no variance.
    """
    head = fne_head(model)
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    moments = RunningMoments(head.num_features)
    try:
        for images in _image_batches(data, batch_size):
            feats = torch.cat(layer_features(model.backbone, images.to(dev)), dim=1)
            moments.update(feats)
    finally:
        model.train(was_training)
    if moments.count == 0:
        raise DataError(
            "the reference set for the FNE statistics is empty (or no image decoded); pass "
            "at least two images of the target domain"
        )
    stats = head.set_statistics(moments.mean, moments.std, moments.count)
    log.info(
        "FNE statistics from %d reference images (%d features, %d without variance)",
        stats.count,
        stats.num_features,
        stats.n_zero_variance,
    )
    return stats


def fit_statistics_from_records(
    model: EmbeddingModel,
    records: pd.DataFrame,
    *,
    root: str | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device | None = None,
) -> FNEStatistics:
    """:func:`fit_statistics` on the images of a record table, with the model's eval preprocessing.

    Images that fail to decode are skipped with a warning.
    """
    ds = RecordDataset(
        records, build_transforms(model.preprocessing, preset="none", train=False), class_to_idx={}, root=root
    )
    loader = make_loader(ds, batch_size=batch_size, num_workers=num_workers)

    def batches() -> Iterable[Any]:
        for batch in loader:
            for index, message in batch["errors"]:
                log.warning("FNE reference image %s skipped: %s", ds.records.at[index, "id"], message)
            yield batch

    return fit_statistics(model, batches(), device=device)


# ----------------------------------------------------------------------------------------------------
# storage in Milvus
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StorageOption:
    """One way to keep an FNE vector in Milvus.

    Attributes:
        kind: ``float32``, ``int8`` or ``binary``.
        field_type: the Milvus field type(s).
        field_dim: the ``dim`` of each field (binary dims are rounded up to a multiple of 8).
        bytes_per_vector: raw bytes of one vector (all fields), without index overhead.
        metrics: metric types that fit, best first.
        milvus_lite: whether Milvus Lite accepts this field type (Lite holds FLOAT_VECTOR only).
        note: what the metric computes on the ternary codes.
    """

    kind: StorageKind
    field_type: str
    field_dim: int
    bytes_per_vector: int
    metrics: tuple[str, ...]
    milvus_lite: bool
    note: str


def fne_storage_report(dim: int) -> dict[StorageKind, StorageOption]:
    """Bytes per vector and the fitting Milvus metric for each way to store a ``dim``-wide FNE code."""
    if dim < 1:
        raise DataError(f"dim must be a positive int; received {dim!r}")
    bits = 8 * math.ceil(dim / 8)
    return {
        "float32": StorageOption(
            "float32",
            "FLOAT_VECTOR",
            dim,
            4 * dim,
            ("COSINE", "IP"),
            True,
            "the model's L2-normalised output as is; IP equals COSINE on it",
        ),
        "int8": StorageOption(
            "int8",
            "INT8_VECTOR",
            dim,
            dim,
            ("COSINE",),
            False,
            "to_int8(): the codes -1/0/1 as int8; COSINE ranks exactly like the float vectors "
            "(IP would rank by agreements minus disagreements, unnormalised). Milvus >= 2.6 server, HNSW",
        ),
        "binary": StorageOption(
            "binary",
            "2 x BINARY_VECTOR (presence, absence)",
            bits,
            2 * bits // 8,
            ("HAMMING", "JACCARD"),
            False,
            "to_presence_absence(): one bit field for code 1, one for code -1; or to_binary_code(), their "
            f"concatenation in one BINARY_VECTOR of dim {2 * bits}, where HAMMING equals the L1 distance "
            "between the ternary codes. BIN_FLAT / BIN_IVF_FLAT indexes, Milvus server",
        ),
    }


def format_storage_report(dim: int, n_vectors: int | None = None) -> str:
    """:func:`fne_storage_report` as a plain-text table (with the total for ``n_vectors``)."""
    rows = [
        [
            "storage",
            "field",
            "dim",
            "bytes/vector",
            *(["total MiB"] if n_vectors else []),
            "metric",
            "Milvus Lite",
        ]
    ]
    for opt in fne_storage_report(dim).values():
        total = [f"{opt.bytes_per_vector * n_vectors / 2**20:.2f}"] if n_vectors else []
        rows.append(
            [
                opt.kind,
                opt.field_type,
                str(opt.field_dim),
                str(opt.bytes_per_vector),
                *total,
                "/".join(opt.metrics),
                "yes" if opt.milvus_lite else "no",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def ternary_codes(vectors: np.ndarray | torch.Tensor) -> np.ndarray:
    """The {-1, 0, 1} codes of FNE vectors, raw or L2-normalised, as int8 ``(N, D)``.

    Raises:
        DataError: the vectors are not ternary codes up to a positive scale per row (e.g. an FNE
            without discretisation, or another model's embeddings).
    """
    v = vectors.detach().cpu().numpy() if isinstance(vectors, torch.Tensor) else np.asarray(vectors)
    if v.ndim == 1:
        v = v[None, :]
    if v.ndim != 2:
        raise DataError(f"FNE vectors must be 2-D (N, dim); received shape {v.shape}")
    v = v.astype(np.float32, copy=False)
    mag = np.abs(v)
    scale = mag.max(axis=1, keepdims=True)
    off = (mag > 0) & (np.abs(mag - scale) > 1e-3 * scale)
    if off.any() or not np.isfinite(v).all():
        row = int(np.argwhere(off)[0, 0]) if off.any() else int(np.argwhere(~np.isfinite(v))[0, 0])
        raise DataError(
            f"row {row} is not a discretised full-network embedding (its non-zero values differ "
            f"in magnitude: {np.unique(mag[row][mag[row] > 0])[:4].tolist()}); int8 and binary "
            f"storage need an FNE model with discretize=True"
        )
    return np.sign(v).astype(np.int8)


def to_int8(vectors: np.ndarray | torch.Tensor) -> np.ndarray:
    """FNE vectors -> int8 ``(N, D)`` for an ``INT8_VECTOR`` field (metric COSINE)."""
    return ternary_codes(vectors)


def to_presence_absence(vectors: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """FNE vectors -> ``(presence, absence)``, each packed uint8 ``(N, ceil(D/8))``.

    Bit ``i`` of ``presence`` is set where code ``i`` is 1, of ``absence`` where it is -1 (big-endian
    bit order within a byte, as ``numpy.packbits`` and pymilvus binary vectors use; padding bits are 0).
    Each is a ``BINARY_VECTOR`` field of dim ``8 * ceil(D/8)``; metric HAMMING or JACCARD.
    """
    codes = ternary_codes(vectors)
    return np.packbits(codes > 0, axis=1), np.packbits(codes < 0, axis=1)


def to_binary_code(vectors: np.ndarray | torch.Tensor) -> np.ndarray:
    """Presence and absence bits in one packed vector ``(N, 2 * ceil(D/8))``.

    HAMMING distance between two such vectors equals the L1 distance between their ternary codes
    (0 where the codes agree, 1 where one is 0, 2 where they are opposite), so one ``BINARY_VECTOR``
    field of dim ``16 * ceil(D/8)`` with metric HAMMING ranks by that distance.
    """
    presence, absence = to_presence_absence(vectors)
    return np.concatenate([presence, absence], axis=1)


def from_presence_absence(presence: np.ndarray, absence: np.ndarray, dim: int) -> np.ndarray:
    """Inverse of :func:`to_presence_absence`: int8 codes ``(N, dim)``."""
    p = np.unpackbits(np.asarray(presence, dtype=np.uint8), axis=1)[:, :dim]
    a = np.unpackbits(np.asarray(absence, dtype=np.uint8), axis=1)[:, :dim]
    if (p & a).any():
        raise DataError("a feature is marked both present and absent; the bit vectors are not an FNE code")
    return p.astype(np.int8) - a.astype(np.int8)


__all__ = [
    "DEFAULT_THRESHOLDS",
    "FNEHead",
    "FNEStatistics",
    "RunningMoments",
    "StorageKind",
    "StorageOption",
    "all_layers",
    "build_fne_model",
    "fit_statistics",
    "fit_statistics_from_records",
    "fne_head",
    "fne_storage_report",
    "format_storage_report",
    "from_presence_absence",
    "layer_features",
    "ternary_codes",
    "to_binary_code",
    "to_int8",
    "to_presence_absence",
    "with_layers",
]
