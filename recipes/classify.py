"""Classify recipe: kNN labels for unlabelled images from a labelled collection, with accuracy on a labelled split.

Each image's ``k`` nearest labelled neighbours vote, weighted by similarity (cosine/inner product: the
score, floored at zero; L2: ``1 / (1 + distance)``), the classic weighted kNN classifier used to
evaluate embeddings (Wu et al. 2018, https://arxiv.org/abs/1805.01978, and DINO, Caron et al. 2021). The
confidence is the winning label's share of the vote.

Accuracy is measured on a labelled split already in the collection: its records are the queries and
the neighbours are drawn only from the other splits, so no query votes for itself.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from deepfeat.connectors.client import MilvusConnector
from deepfeat.connectors.collection import open_collection
from deepfeat.connectors.query import build_filter, collection_frame, search_vectors
from deepfeat.finetune.errors import DataError
from deepfeat.finetune.models.bundle import ModelBundle
from deepfeat.recipes.config import RecipeConfig
from deepfeat.recipes.engine import RecipeContext
from deepfeat.recipes.recipes import read_any

log = logging.getLogger(__name__)

Weighting = Literal["similarity", "uniform"]


@dataclass
class Prediction:
    """A kNN prediction: the label (``None`` without neighbours), its share of the vote, all votes."""

    label: str | None
    confidence: float
    votes: dict[str, float] = field(default_factory=dict)
    neighbours: int = 0


def vote(
    hits: Sequence[dict[str, Any]],
    *,
    metric: str = "COSINE",
    weighting: Weighting = "similarity",
    label_field: str = "label",
) -> Prediction:
    """The weighted kNN vote of one query's hits (ties go to the label seen first, i.e. the closest)."""
    if weighting not in ("similarity", "uniform"):
        raise DataError(f"weighting must be 'similarity' or 'uniform', got {weighting!r}")
    votes: dict[str, float] = {}
    for h in hits:
        score = float(h["score"])
        if weighting == "uniform":
            weight = 1.0
        elif metric == "L2":
            weight = 1.0 / (1.0 + max(score, 0.0))
        else:
            weight = max(score, 0.0) + 1e-6  # a tiny floor keeps orthogonal neighbours as tie-breakers
        label = str(h.get(label_field))
        votes[label] = votes.get(label, 0.0) + weight
    if not votes:
        return Prediction(None, 0.0, {}, 0)
    best = max(votes, key=lambda k: votes[k])  # dicts keep insertion order: ties go to the closest hit's label
    return Prediction(best, votes[best] / sum(votes.values()), votes, len(hits))


def _metric(conn: MilvusConnector, collection: str) -> str:
    return open_collection(conn, collection, foreign_ok=True).metric


def classify_vectors(
    conn: MilvusConnector,
    collection: str,
    vectors: np.ndarray,
    *,
    k: int = 10,
    filter: str | None = None,
    weighting: Weighting = "similarity",
    label_field: str = "label",
) -> list[Prediction]:
    """kNN predictions for query vectors (n, dim) from the labelled rows of ``collection`` matching ``filter``."""
    if k < 1:
        raise DataError(f"k must be >= 1, got {k}")
    metric = _metric(conn, collection)
    hits = search_vectors(conn, collection, vectors, top_k=k, filter=filter, output_fields=["record_id", label_field])
    if len(hits) and not any(len(h) for h in hits):  # no neighbour for any query: nothing to vote with
        where = f"no row of collection {collection!r} matches the filter {filter!r}" if filter else \
            f"collection {collection!r} has no rows"
        raise DataError(f"cannot classify: {where}, so every prediction would be empty; load labelled "
                        f"images into it first ('deepfeat load'){' or loosen --filter' if filter else ''}")
    return [vote(h, metric=metric, weighting=weighting, label_field=label_field) for h in hits]


def classify_images(
    conn: MilvusConnector,
    collection: str,
    bundle: ModelBundle | str | Path,
    images: Sequence[Any],
    *,
    k: int = 10,
    filter: str | None = None,
    weighting: Weighting = "similarity",
    label_field: str = "label",
    batch_size: int = 64,
) -> list[Prediction]:
    """kNN predictions for images (paths, encoded bytes or arrays), embedded with ``bundle``.

    Raises:
        MismatchError: ``bundle`` is not the bundle that filled the collection.
    """
    model = bundle if isinstance(bundle, ModelBundle) else ModelBundle.load(bundle)
    open_collection(conn, collection, bundle=model, what="classifying", foreign_ok=True)
    if not len(images):
        return []
    vectors = model.embed(list(images), batch_size=batch_size)
    return classify_vectors(conn, collection, vectors, k=k, filter=filter, weighting=weighting, label_field=label_field)


@dataclass
class KnnReport:
    """kNN accuracy on one labelled split of a collection.

    Attributes:
        accuracy: share of the split's records whose predicted label is their own.
        chance: ``1 / number of classes`` among the reference records.
        majority: accuracy of always predicting the most frequent reference label.
        predictions: ``record_id, label, predicted, confidence, correct`` per query.
    """

    split: str
    k: int
    n: int
    n_reference: int
    accuracy: float
    chance: float
    majority: float
    predictions: pd.DataFrame = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no per-record predictions)."""
        return {
            "split": self.split,
            "k": self.k,
            "n": self.n,
            "n_reference": self.n_reference,
            "accuracy": self.accuracy,
            "chance": self.chance,
            "majority": self.majority,
        }


def knn_accuracy(
    conn: MilvusConnector,
    collection: str,
    *,
    split: str = "test",
    k: int = 10,
    weighting: Weighting = "similarity",
    label_field: str = "label",
) -> KnnReport:
    """Accuracy of the kNN vote on the records of ``split``, with neighbours from the other splits only.

    Raises:
        DataError: the split has no records in the collection, or the other splits have none.
    """
    queries, vectors = collection_frame(
        conn, collection, ("record_id", label_field, "split"), filter=build_filter(equals={"split": split})
    )
    reference, _ = collection_frame(
        conn, collection, ("record_id", label_field), filter=build_filter(not_equals={"split": split})
    )
    predictions = classify_vectors(
        conn,
        collection,
        vectors,
        k=k,
        filter=build_filter(not_equals={"split": split}),
        weighting=weighting,
        label_field=label_field,
    )
    table = pd.DataFrame(
        {
            "record_id": queries["record_id"].astype(str),
            "label": queries[label_field].astype(str),
            "predicted": [p.label for p in predictions],
            "confidence": [round(p.confidence, 4) for p in predictions],
        }
    )
    table["correct"] = table["label"] == table["predicted"]
    counts = reference[label_field].astype(str).value_counts()
    report = KnnReport(
        split=split,
        k=k,
        n=len(table),
        n_reference=len(reference),
        accuracy=float(table["correct"].mean()),
        chance=1.0 / len(counts),
        majority=float((table["label"] == counts.index[0]).mean()),
        predictions=table,
    )
    log.info(
        "kNN (k=%d) accuracy on %r: %.3f (%d records; chance %.3f)", k, split, report.accuracy, report.n, report.chance
    )
    return report


def write_predictions_csv(predictions: Sequence[Prediction], sources: Sequence[str], path: str | Path) -> Path:
    """``source, predicted, confidence, votes`` per image (votes as ``label:weight`` pairs, best first)."""
    if len(predictions) != len(sources):
        raise DataError(f"{len(predictions)} predictions for {len(sources)} images")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["source", "predicted", "confidence", "votes"])
        for src, p in zip(sources, predictions, strict=True):
            ranked = sorted(p.votes.items(), key=lambda kv: -kv[1])
            writer.writerow(
                [
                    src,
                    p.label if p.label is not None else "",
                    f"{p.confidence:.4f}",
                    " ".join(f"{k}:{v:.3f}" for k, v in ranked),
                ]
            )
    return out


def read(source: str, config: RecipeConfig) -> pd.DataFrame:
    """The recipe's reader: a labelled folder or manifest."""
    return read_any(source)


def act(ctx: RecipeContext) -> dict[str, Any]:
    """Accuracy on the labelled split (``recipe.classify.split``), and labels for ``--query`` images."""
    opts = ctx.config.action
    k = int(opts.get("k", 10))
    weighting: Weighting = opts.get("weighting", "similarity")
    split = str(opts.get("split", "test"))
    report = knn_accuracy(ctx.conn, ctx.collection, split=split, k=k, weighting=weighting)
    labelled = ctx.out / "predictions_labelled.csv"
    report.predictions.to_csv(labelled, index=False)
    files = {"labelled": str(labelled)}
    unlabelled: list[dict[str, Any]] = []
    if ctx.queries:
        # every labelled record votes for new images, the held-out split included
        preds = classify_images(ctx.conn, ctx.collection, ctx.bundle, ctx.queries, k=k, weighting=weighting)
        files["unlabelled"] = str(write_predictions_csv(preds, ctx.queries, ctx.out / "predictions.csv"))
        unlabelled = [
            {"source": s, "predicted": p.label, "confidence": round(p.confidence, 4)}
            for s, p in zip(ctx.queries, preds, strict=True)
        ]
    return {**report.to_dict(), "unlabelled": unlabelled, "files": files}
