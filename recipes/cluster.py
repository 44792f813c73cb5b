"""Cluster recipe: k-means on the embeddings of a collection, with a picture of sample images per cluster.

Vectors are L2-normalised before k-means for cosine collections (spherical k-means in effect, the
geometry the model was trained for). Clusters are numbered by size, largest first; each record gets its
cluster and its distance to the cluster centre, and the picture shows the images closest to each
centre (the most typical members). When the records carry labels, purity and the adjusted Rand index
say how well the clusters recover them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from deepfeat.connectors.client import MilvusConnector
from deepfeat.connectors.collection import open_collection
from deepfeat.connectors.query import collection_frame
from deepfeat.finetune.errors import DataError
from deepfeat.recipes.config import RecipeConfig
from deepfeat.recipes.engine import RecipeContext
from deepfeat.recipes.recipes import read_any, record_image
from deepfeat.recipes.viz import image_rows

log = logging.getLogger(__name__)


@dataclass
class ClusterResult:
    """k-means clusters of a collection.

    Attributes:
        assignments: ``record_id, label, path, cluster, distance`` per record.
        sizes: records per cluster (cluster 0 is the largest).
        purity: share of records in their cluster's majority label (``None`` without labels).
        ari: adjusted Rand index between clusters and labels (``None`` without labels).
    """

    k: int
    assignments: pd.DataFrame = field(repr=False)
    sizes: list[int]
    inertia: float
    purity: float | None
    ari: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "k": self.k,
            "n": len(self.assignments),
            "sizes": self.sizes,
            "inertia": self.inertia,
            "purity": self.purity,
            "ari": self.ari,
        }


def kmeans(
    vectors: np.ndarray, k: int, *, seed: int = 0, normalize: bool = True
) -> tuple[np.ndarray, np.ndarray, float]:
    """``(labels, distances to own centre, inertia)`` of k-means (scikit-learn), clusters numbered by size."""
    from sklearn.cluster import KMeans

    x = np.asarray(vectors, dtype=np.float32)
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    model = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x)
    raw = model.labels_.astype(np.int64)
    order = np.argsort(-np.bincount(raw, minlength=k), kind="stable")
    renumber = np.empty(k, dtype=np.int64)
    renumber[order] = np.arange(k)
    distances = np.linalg.norm(x - model.cluster_centers_[raw], axis=1)
    return renumber[raw], distances, float(model.inertia_)


def cluster_collection(
    conn: MilvusConnector, collection: str, k: int, *, seed: int = 0, filter: str | None = None
) -> ClusterResult:
    """k-means with ``k`` clusters over the rows of ``collection`` (those matching ``filter``).

    Raises:
        DataError: ``k`` < 2 or more than the number of rows.
    """
    from sklearn.metrics import adjusted_rand_score

    spec = open_collection(conn, collection)
    rows, vectors = collection_frame(conn, collection, ("record_id", "label", "path"), filter=filter)
    if not 2 <= k <= len(rows):
        raise DataError(f"k must be between 2 and the number of rows ({len(rows)}), got {k}")
    labels, distances, inertia = kmeans(vectors, k, seed=seed, normalize=spec.metric != "L2")
    table = rows[["record_id", "label", "path"]].assign(cluster=labels, distance=np.round(distances, 6))
    table = table.sort_values(["cluster", "distance", "record_id"], kind="stable").reset_index(drop=True)
    sizes = np.bincount(labels, minlength=k).tolist()
    truth = table["label"].astype(str)
    purity = ari = None
    if truth.nunique() > 1:
        purity = float(table.groupby("cluster")["label"].agg(lambda s: s.value_counts().iloc[0]).sum() / len(table))
        ari = float(adjusted_rand_score(truth, table["cluster"]))
    log.info("k-means: %d clusters of sizes %s (purity %s)", k, sizes, purity)
    return ClusterResult(k=k, assignments=table, sizes=sizes, inertia=inertia, purity=purity, ari=ari)


def write_clusters(
    result: ClusterResult,
    out_dir: str | Path,
    *,
    per_cluster: int = 8,
    image_of: Callable[[Mapping[str, Any]], np.ndarray | None] | None = None,
) -> dict[str, Path]:
    """``clusters.csv`` (one row per record) and ``clusters.png`` (the images nearest each centre).

    Args:
        image_of: a record's image from its row (``record_id``, ``path``, ...); default: read ``path``.
            Rows without an image are left out of the picture.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "clusters.csv"
    result.assignments.to_csv(csv_path, index=False)
    load = image_of or (lambda row: record_image(row) if row.get("path") else None)
    rows = []
    for cluster, members in result.assignments.groupby("cluster", sort=True):
        images, captions = [], []
        for _, row in members.head(per_cluster).iterrows():
            image = load({str(k): v for k, v in row.items()})
            if image is not None:
                images.append(image)
                captions.append(str(row["label"]))
        rows.append({"title": f"cluster {cluster} ({len(members)})", "images": images, "captions": captions})
    if not any(r["images"] for r in rows):
        raise DataError(
            "no image of any cluster could be read for the picture; the collection's 'path' field is "
            "empty or the files moved"
        )
    png = image_rows(rows, out / "clusters.png", title=f"k-means, k={result.k}: images nearest each centre")
    return {"csv": csv_path, "picture": png}


def read(source: str, config: RecipeConfig) -> pd.DataFrame:
    """The recipe's reader: any folder or manifest (labels only score the clusters)."""
    return read_any(source)


def act(ctx: RecipeContext) -> dict[str, Any]:
    """k-means with ``recipe.cluster.k`` clusters (default: the number of labels), CSV and picture."""
    opts = ctx.config.action
    k = opts.get("k") or int(ctx.records["label"].nunique())
    result = cluster_collection(ctx.conn, ctx.collection, int(k), seed=int(opts.get("seed", 0)))
    by_id = ctx.record_by_id()

    def image_of(row: Mapping[str, Any]) -> np.ndarray | None:
        rid = str(row["record_id"])
        return record_image(by_id.loc[rid]) if rid in by_id.index else None

    files = write_clusters(result, ctx.out, per_cluster=int(opts.get("per_cluster", 8)), image_of=image_of)
    return {**result.to_dict(), "files": {k: str(v) for k, v in files.items()}}
