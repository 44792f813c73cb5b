"""Dedup recipe: near-duplicate groups in a collection, by range search at a similarity threshold.

Every stored vector is searched with a range search (``radius`` = the threshold: cosine similarity above
it for ``COSINE``/``IP`` collections, L2 distance below it for ``L2``); each hit is an edge, and the
connected components of the edges are the duplicate groups (so A~B and B~C put A, B, C together even
when A and C are slightly further apart). The report is a CSV with one row per member of a group and a
``keep`` column naming one representative per group.

A collection keyed by ``content_hash`` already stores byte-identical files once; key it by ``record_id``
(the default) to see them as a group here.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from deepfeat.connectors.query import collection_frame
from deepfeat.finetune.errors import DataError
from deepfeat.recipes.config import RecipeConfig
from deepfeat.recipes.engine import RecipeContext
from deepfeat.recipes.recipes import read_any, record_image

if TYPE_CHECKING:
    from deepfeat.connectors.client import MilvusConnector

log = logging.getLogger(__name__)

#: Default similarity above which two images count as near-duplicates (cosine, deepfeat bundles).
DEFAULT_THRESHOLD = 0.95


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
    from deepfeat.connectors.collection import open_collection
    from deepfeat.connectors.search import search_vectors

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
        "%d near-duplicate group(s) (%d removable records) among %d at threshold %s",
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
    from deepfeat.recipes.viz import image_rows

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
    return image_rows(rows, path, title=f"near-duplicate groups (threshold {report.threshold})")


def act(ctx: RecipeContext) -> dict[str, Any]:
    """Duplicate groups of the loaded collection at ``recipe.dedup.threshold``, as CSV and a picture."""
    opts = ctx.config.action
    report = find_duplicates(
        ctx.conn,
        ctx.collection,
        threshold=float(opts.get("threshold", DEFAULT_THRESHOLD)),
        max_neighbours=int(opts.get("max_neighbours", 32)),
    )
    path = write_duplicates_csv(report, ctx.out / "duplicates.csv")
    by_id = ctx.record_by_id()

    def image_of(rid: str) -> np.ndarray | None:
        return record_image(by_id.loc[rid]) if rid in by_id.index else None

    picture = groups_picture(report, ctx.out / "duplicates.png", image_of)
    return {
        "threshold": report.threshold,
        "n_records": report.n_records,
        "n_groups": len(report.groups),
        "n_duplicates": report.n_duplicates,
        "groups": report.groups,
        "files": {"csv": str(path), "picture": str(picture) if picture else None},
    }
