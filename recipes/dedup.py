"""Dedup recipe: near-duplicate groups in a collection, by range search at a similarity threshold.

Every stored vector is searched with a range search (``radius`` = the threshold: cosine similarity above
it for ``COSINE``/``IP`` collections, L2 distance below it for ``L2``); each hit is an edge, and the
connected components of the edges are the duplicate groups (so A~B and B~C put A, B, C together even
when A and C are slightly further apart). The report is a CSV with one row per member of a group and a
``keep`` column naming one representative per group.

A collection keyed by ``content_hash`` already stores byte-identical files once; key it by ``record_id``
(the default) to see them as a group here.

The threshold is calibrated on the collection's own images by default (:func:`calibrate_threshold`): sampled
images are copied the ways near-duplicates arise (a JPEG re-encode, a smaller size, brighter or darker), embedded
with the bundle, and the threshold is put between the copies' scores and the scores of distinct images. Which
model space suits it: an **instance-level** one, the off-the-shelf features (a bundle exported from the pretrained
backbone, ``recipe.train=false``), where a copy stays closer to its original than any other image. A space
fine-tuned to classes (the fashion recipe's) pulls different items of one class together on purpose: copies and
distinct items of a class score alike there, which the calibration reports (``separated`` false) instead of
grouping them.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from PIL import Image

from deepfeat.connectors.collection import open_collection
from deepfeat.connectors.query import collection_frame, search_vectors
from deepfeat.finetune.data.images import load_image
from deepfeat.finetune.errors import DataError
from deepfeat.recipes.config import RecipeConfig
from deepfeat.recipes.engine import RecipeContext
from deepfeat.recipes.recipes import read_any, record_image
from deepfeat.recipes.viz import image_rows

if TYPE_CHECKING:
    from deepfeat.connectors.client import MilvusConnector
    from deepfeat.finetune.models.bundle import ModelBundle

log = logging.getLogger(__name__)

#: A fixed similarity for near-duplicates (cosine), when no calibration is wanted; the commands calibrate.
DEFAULT_THRESHOLD = 0.95
#: How near-duplicates arise: the copies :func:`calibrate_threshold` makes of each sampled image.
COPY_KINDS: tuple[str, ...] = ("jpeg q75", "half size", "brighter 1.2x", "darker 0.8x")


def augmented_copies(image: np.ndarray) -> list[np.ndarray]:
    """Copies of an ``(H, W, 3)`` uint8 image as near-duplicates arise (:data:`COPY_KINDS`, in that order): a JPEG
    re-encode at quality 75 (encoded and decoded again), half the size, and the brightness scaled by 1.2 and 0.8."""
    pil = Image.fromarray(image)
    encoded = io.BytesIO()
    pil.save(encoded, format="JPEG", quality=75)
    half = pil.resize((max(8, image.shape[1] // 2), max(8, image.shape[0] // 2)), Image.Resampling.BILINEAR)
    scaled = [np.clip(image.astype(np.float32) * f, 0, 255).astype(np.uint8) for f in (1.2, 0.8)]
    return [load_image(encoded.getvalue()), np.asarray(half.convert("RGB")), *scaled]


@dataclass
class Calibration:
    """A near-duplicate threshold measured on the data: augmented copies against distinct images.

    Attributes:
        threshold: the similarity above which two images are grouped.
        n_images: images sampled (each copied :data:`COPY_KINDS` ways).
        copy_scores: similarity of every copy to its original.
        distinct_scores: similarity of every pair of distinct sampled images.
        separated: every copy scores above every distinct pair: the threshold lies in the gap between them.
            When false the model space does not tell copies from distinct images (a space fine-tuned to
            classes); the threshold then minimises the errors on the sample.
        suspected_duplicates: pairs of sampled images that scored like copies (at least the copies' median) and
            were few enough (1% of the pairs, or one) to be taken for duplicates already in the data.
    """

    threshold: float
    n_images: int
    copy_scores: np.ndarray = field(repr=False)
    distinct_scores: np.ndarray = field(repr=False)
    separated: bool
    suspected_duplicates: int = 0

    @property
    def lowest_copy(self) -> float:
        """The copy least similar to its original."""
        return float(self.copy_scores.min())

    @property
    def highest_distinct(self) -> float:
        """The most similar pair of distinct images (``-1`` with a single image)."""
        return float(self.distinct_scores.max()) if self.distinct_scores.size else -1.0

    def summary(self) -> str:
        """One line: the threshold, and the two score ranges it separates (or the warning that it does not)."""
        line = (f"threshold {self.threshold:.4f} calibrated on {self.n_images} images: their copies "
                f"({', '.join(COPY_KINDS)}) score {self.lowest_copy:.4f}-{float(self.copy_scores.max()):.4f}, "
                f"distinct images at most {self.highest_distinct:.4f}")
        if self.suspected_duplicates:
            line += (f" ({self.suspected_duplicates} sampled pair(s) scoring like copies taken for duplicates "
                     f"already in the data)")
        if self.separated:
            return line
        missed = int((self.copy_scores < self.threshold).sum())
        merged = int((self.distinct_scores >= self.threshold).sum())
        return (f"{line}; this model space does not separate copies from distinct images ({missed} of "
                f"{self.copy_scores.size} copies missed, {merged} of {self.distinct_scores.size} distinct pairs "
                f"grouped on the sample): use instance-level features, e.g. the off-the-shelf backbone "
                f"(recipe.train=false), not a space fine-tuned to classes")


def calibrate_from_images(bundle: ModelBundle, images: Sequence[np.ndarray], *, metric: str = "COSINE"
                          ) -> Calibration:
    """Calibrate a near-duplicate threshold on ``images`` (decoded, distinct) with ``bundle``.

    Each image and its :func:`augmented_copies` are embedded; the copies' similarities to their originals are
    the scores duplicates get, the similarities between different images the scores distinct images get. With a
    gap between the two, the threshold is its middle; without one, the score that makes the fewest errors on the
    sample (and :attr:`Calibration.separated` is false).

    Raises:
        DataError: fewer than 2 images, or an L2 collection (its threshold is a distance: give one).
    """
    if metric == "L2":
        raise DataError("automatic calibration works on COSINE/IP collections; for an L2 collection give the "
                        "distance with --threshold")
    if len(images) < 2:
        raise DataError(f"calibrating a near-duplicate threshold needs 2+ readable images, got {len(images)}; give "
                        f"--threshold VALUE instead")
    n_copies = len(COPY_KINDS)
    batch = [im for image in images for im in (image, *augmented_copies(image))]
    log.info("calibrating the near-duplicate threshold: embedding %d images and %d copies", len(images),
             len(batch) - len(images))
    vectors = bundle.embed(batch).reshape(len(images), n_copies + 1, -1)
    if metric == "COSINE":
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
    originals = vectors[:, 0]
    copy_scores = np.einsum("nd,nkd->nk", originals, vectors[:, 1:]).reshape(-1)
    same = np.array([[a.shape == b.shape and np.array_equal(a, b) for b in images] for a in images])
    pair_scores = (originals @ originals.T)[np.triu(~same, k=1)]
    # A pair of sampled images that scores like a typical copy is most likely a duplicate already in the data (the
    # reason to run dedup), not two distinct images: a few such pairs are set aside. Many of them mean the space
    # scores distinct images like copies (a space fine-tuned to classes), and they are kept, to say so.
    like_copies = pair_scores >= float(np.median(copy_scores))
    suspected = int(like_copies.sum()) if like_copies.sum() <= max(1.0, 0.01 * pair_scores.size) else 0
    distinct_scores = pair_scores[~like_copies] if suspected else pair_scores
    lowest, highest = float(copy_scores.min()), float(distinct_scores.max()) if distinct_scores.size else -1.0
    if lowest > highest:
        threshold, separated = (lowest + highest) / 2, True
    else:
        candidates = np.unique(np.concatenate([copy_scores, distinct_scores]))
        errors = [(copy_scores < c).sum() + (distinct_scores >= c).sum() for c in candidates]
        threshold, separated = float(candidates[int(np.argmin(errors))]), False
    calibration = Calibration(float(threshold), len(images), copy_scores, distinct_scores, separated, suspected)
    log.info(calibration.summary())
    return calibration


def calibrate_threshold(conn: MilvusConnector, collection: str, bundle: ModelBundle, *, n_images: int = 48,
                        seed: int = 0, filter: str | None = None) -> Calibration:
    """Calibrate the near-duplicate threshold of ``collection`` on ``n_images`` of its own images (see
    :func:`calibrate_from_images`); rows whose image cannot be read are skipped.

    Raises:
        MismatchError: ``bundle`` did not fill the collection.
        DataError: fewer than 2 readable images.
    """
    spec = open_collection(conn, collection, bundle=bundle)
    rows, _ = collection_frame(conn, collection, ("record_id", "path"), filter=filter or "")
    order = np.random.default_rng(seed).permutation(len(rows))
    images: list[np.ndarray] = []
    for i in order:
        if len(images) >= n_images:
            break
        row = rows.iloc[int(i)]
        image = record_image({"id": row["record_id"], "path": row.get("path")})
        if image is not None:
            images.append(image)
    return calibrate_from_images(bundle, images, metric=spec.metric)


@dataclass
class DuplicateReport:
    """Duplicate groups of a collection.

    Attributes:
        groups: record ids of each group (2+ members), largest group first, members sorted.
        pairs: every edge found, ``(record_id, record_id, score)`` with the smaller id first.
        rows: ``record_id``, ``path``, ``label`` of every record searched.
    """

    threshold: float
    metric: str
    n_records: int
    groups: list[list[str]]
    pairs: list[tuple[str, str, float]]
    rows: pd.DataFrame = field(repr=False)

    @property
    def n_duplicates(self) -> int:
        """Records that could go: every member of a group but one."""
        return sum(len(g) - 1 for g in self.groups)

    def group_of(self) -> dict[str, int]:
        """Record id -> group number (records without duplicates are absent)."""
        return {rid: i for i, members in enumerate(self.groups) for rid in members}


class _Components:
    """Union-find over record ids."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> list[list[str]]:
        members: dict[str, list[str]] = {}
        for x in self.parent:
            members.setdefault(self.find(x), []).append(x)
        return sorted((sorted(m) for m in members.values() if len(m) > 1), key=lambda m: (-len(m), m[0]))


def find_duplicates(
    conn: MilvusConnector,
    collection: str,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    max_neighbours: int = 32,
    filter: str | None = None,
    batch_size: int = 256,
) -> DuplicateReport:
    """Near-duplicate groups among the rows of ``collection`` (those matching ``filter``).

    Args:
        threshold: for COSINE/IP collections, the similarity above which two images are duplicates
            (1.0 = identical vectors); for L2, the distance below which they are.
        max_neighbours: most duplicates fetched per image (groups still link through their members).
        filter: a Milvus expression restricting both the images checked and their duplicates.

    Raises:
        DataError: a threshold outside the metric's range, or an empty collection.
    """
    spec = open_collection(conn, collection)
    if spec.metric == "L2":
        if threshold <= 0:
            raise DataError(f"for an L2 collection the threshold is a distance and must be > 0, got {threshold}")
    elif not -1.0 < threshold < 1.0:
        raise DataError(
            f"for a {spec.metric} collection the threshold is a similarity in (-1, 1), got {threshold}; "
            f"e.g. 0.95 for near-duplicates"
        )
    if max_neighbours < 1:
        raise DataError(f"max_neighbours must be >= 1, got {max_neighbours}")
    rows, vectors = collection_frame(conn, collection, ("record_id", "label", "path"), filter=filter or "")
    hits = search_vectors(
        conn,
        collection,
        vectors,
        top_k=max_neighbours + 1,
        radius=threshold,
        filter=filter,
        output_fields=["record_id"],
        batch_size=batch_size,
    )
    components = _Components()
    pairs: dict[tuple[str, str], float] = {}
    for rid, found in zip(rows["record_id"].astype(str), hits, strict=True):
        components.find(rid)
        for h in found:
            other = str(h["record_id"])
            if other == rid:
                continue
            components.union(rid, other)
            key = (min(rid, other), max(rid, other))
            pairs[key] = (
                max(pairs.get(key, -np.inf), float(h["score"]))
                if spec.metric != "L2"
                else min(pairs.get(key, np.inf), float(h["score"]))
            )
    groups = components.groups()
    report = DuplicateReport(
        threshold=threshold,
        metric=spec.metric,
        n_records=len(rows),
        groups=groups,
        pairs=[(a, b, s) for (a, b), s in sorted(pairs.items())],
        rows=rows,
    )
    log.info(
        "%d near-duplicate group(s) (%d removable records) among %d at threshold %.4f",
        len(groups),
        report.n_duplicates,
        len(rows),
        threshold,
    )
    return report


def write_duplicates_csv(report: DuplicateReport, path: str | Path) -> Path:
    """One row per member of a duplicate group: ``group, group_size, keep, record_id, path, label, best_score``.

    ``keep`` marks one representative per group (its first id); ``best_score`` is the member's closest
    match within the group.
    """
    best: dict[str, float] = {}
    closer = min if report.metric == "L2" else max
    for a, b, score in report.pairs:
        for rid in (a, b):
            best[rid] = closer(best.get(rid, score), score)
    info = report.rows.set_index(report.rows["record_id"].astype(str))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["group", "group_size", "keep", "record_id", "path", "label", "best_score"])
        for number, members in enumerate(report.groups):
            for i, rid in enumerate(members):
                row: Mapping[Any, Any] = info.loc[rid].to_dict() if rid in info.index else {}
                writer.writerow(
                    [
                        number,
                        len(members),
                        i == 0,
                        rid,
                        row.get("path", ""),
                        row.get("label", ""),
                        f"{best.get(rid, float('nan')):.6f}",
                    ]
                )
    return out


def read(source: str, config: RecipeConfig) -> pd.DataFrame:
    """The recipe's reader: any folder (class sub-folders, or loose images when ``recipe.train`` is false)."""
    return read_any(source)


def groups_picture(
    report: DuplicateReport,
    path: str | Path,
    image_of: Callable[[str], np.ndarray | None],
    *,
    max_groups: int = 12,
    max_members: int = 8,
) -> Path | None:
    """A picture of the largest groups, one row each (``None`` when there is no group to draw)."""
    rows = []
    for number, members in enumerate(report.groups[:max_groups]):
        images = [(rid, im) for rid in members[:max_members] if (im := image_of(rid)) is not None]
        if images:
            rows.append(
                {
                    "title": f"group {number} ({len(members)})",
                    "images": [im for _, im in images],
                    "captions": [Path(rid).name for rid, _ in images],
                }
            )
    if not rows:
        return None
    return image_rows(rows, path, title=f"near-duplicate groups (threshold {report.threshold:.4f})")


def act(ctx: RecipeContext) -> dict[str, Any]:
    """Duplicate groups of the loaded collection at ``recipe.dedup.threshold``, as CSV and a picture."""
    opts = ctx.config.action
    calibration = None
    threshold = opts.get("threshold")
    if threshold is None:  # calibrated on the collection's own images
        calibration = calibrate_threshold(ctx.conn, ctx.collection, ctx.bundle)
        threshold = calibration.threshold
    report = find_duplicates(
        ctx.conn,
        ctx.collection,
        threshold=float(threshold),
        max_neighbours=int(opts.get("max_neighbours", 32)),
    )
    path = write_duplicates_csv(report, ctx.out / "duplicates.csv")
    by_id = ctx.record_by_id()

    def image_of(rid: str) -> np.ndarray | None:
        return record_image(by_id.loc[rid]) if rid in by_id.index else None

    picture = groups_picture(report, ctx.out / "duplicates.png", image_of)
    return {
        "threshold": report.threshold,
        "calibration": calibration.summary() if calibration is not None else "fixed by recipe.dedup.threshold",
        "n_records": report.n_records,
        "n_groups": len(report.groups),
        "n_duplicates": report.n_duplicates,
        "groups": report.groups,
        "files": {"csv": str(path), "picture": str(picture) if picture else None},
    }
