"""Splits and retrieval protocols over validated records: which images train, which evaluate, and how.

:func:`split_by_class` makes class-disjoint train/val/test (retrieval of unseen classes),
:func:`split_by_group` splits within classes keeping each group (product, patient) in one split,
:func:`sample_per_class` keeps a few images per class for tiny runs.

Retrieval protocols (:func:`assign_query_gallery`): ``"all_vs_all"`` makes every image of a split
both a query and a gallery item, and a query is never matched against itself (the leave-one-out
protocol used for CUB-200, Cars-196 and Stanford Online Products in OML and most metric-learning
papers); ``"holdout"`` makes a fraction of each class queries and the rest the gallery, like a
deployed search where the gallery is indexed and queries are new images.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from typing import Literal, cast, get_args

import numpy as np
import pandas as pd

from deepfeat.finetune.data.contract import SPLITS, QueryGalleryMode, Split, require_columns
from deepfeat.finetune.errors import DataError

__all__ = ["VAL_MODES", "ValMode", "assign_query_gallery", "hold_out", "sample_per_class", "split_by_class",
           "split_by_group"]

#: How a held-out split relates to the training images: ``unseen_classes`` (whole classes: retrieval of categories
#: the model never trained on), ``unseen_groups`` (whole groups, classes shared: new products or patients of known
#: classes), ``same_classes`` (images of the training classes at random, groups ignored: new photos of known items).
ValMode = Literal["unseen_classes", "unseen_groups", "same_classes"]
VAL_MODES: tuple[ValMode, ...] = get_args(ValMode)

logger = logging.getLogger(__name__)


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or any(not np.isfinite(f) or f < 0 for f in values) or abs(sum(values) - 1) > 1e-6:
        raise DataError(
            f"fractions must be three non-negative numbers (train, val, test) that sum to 1, got "
            f"{tuple(fractions)}"
        )
    return cast("tuple[float, float, float]", values)


def _allocate(total: int, fractions: tuple[float, float, float]) -> list[int]:
    """Split ``total`` items by largest remainder, giving every non-zero fraction at least one."""
    exact = [f * total for f in fractions]
    counts = [int(np.floor(e)) for e in exact]
    order = sorted(range(3), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    for i in range(3):
        if fractions[i] > 0 and counts[i] == 0:
            donor = max(range(3), key=lambda j: counts[j])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] += 1
    return counts


def _reset_query_gallery(df: pd.DataFrame) -> pd.DataFrame:
    evaluation = df["split"] != "train"
    df["is_query"] = evaluation
    df["is_gallery"] = evaluation
    return df


def _warn_empty_splits(df: pd.DataFrame, fractions: tuple[float, float, float], unit: str) -> None:
    for name, fraction in zip(SPLITS, fractions, strict=True):
        if fraction > 0 and not (df["split"] == name).any():
            logger.warning(
                "split %r is empty although its fraction is %.3g: too few %s to share out",
                name,
                fraction,
                unit,
            )


def split_by_class(
    df: pd.DataFrame,
    *,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> pd.DataFrame:
    """Assign whole classes to train/val/test, so that evaluation measures retrieval of unseen classes.

    This is the zero-shot protocol of CUB-200, Cars-196 and Stanford Online Products. Fractions count
    classes, not images (largest remainder; every split with a non-zero fraction gets at least one
    class when there are enough). Classes linked by a shared ``group`` move together, so groups never
    straddle splits. ``is_query``/``is_gallery`` are reset to all-vs-all in val/test.

    Args:
        df: validated records.
        fractions: (train, val, test) shares of the classes, summing to 1.
        seed: the same seed and records always give the same split.

    Returns:
        A copy with ``split``, ``is_query`` and ``is_gallery`` reassigned.
    """
    parts = _check_fractions(fractions)
    require_columns(df, ("id", "label", "group"), "split_by_class")
    out = df.copy()
    labels = sorted(out["label"].unique().tolist())
    parent = {label: label for label in labels}

    def find(label: str) -> str:
        while parent[label] != label:
            parent[label] = parent[parent[label]]
            label = parent[label]
        return label

    per_group = out.groupby("group", sort=True)["label"].unique()
    for linked in per_group[per_group.map(len) > 1].tolist():
        first = find(linked[0])
        for other in linked[1:]:
            parent[find(other)] = first
    components: dict[str, list[str]] = {}
    for label in labels:
        components.setdefault(find(label), []).append(label)
    ordered = sorted(components.values())
    if len(ordered) < len(labels):
        logger.info("%d classes share groups and form %d blocks kept together", len(labels), len(ordered))

    counts = _allocate(len(labels), parts)
    slots = [name for name, count in zip(SPLITS, counts, strict=True) for _ in range(count)]
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    position = 0
    for block in (ordered[i] for i in rng.permutation(len(ordered))):
        name = slots[min(position, len(slots) - 1)]
        for label in block:
            assignment[label] = name
        position += len(block)
    out["split"] = out["label"].map(assignment)
    out = _reset_query_gallery(out)
    _warn_empty_splits(out, parts, "classes")
    logger.info(
        "split_by_class: %s classes in train/val/test",
        [int(out.loc[out["split"] == s, "label"].nunique()) for s in SPLITS],
    )
    return out


def split_by_group(
    df: pd.DataFrame,
    *,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> pd.DataFrame:
    """Split the images of every class at random by ``fractions``, keeping each ``group`` in one split.

    Classes are shared by all splits (the seen-classes protocol). Within a class, groups are
    shuffled and laid end to end by image count; a group goes to the split its midpoint falls in,
    so shares are met as closely as whole groups allow. A group spanning several classes is placed
    with its most frequent class. ``is_query``/``is_gallery`` are reset to all-vs-all in val/test.

    Args:
        df: validated records.
        fractions: (train, val, test) shares of each class's images, summing to 1.
        seed: the same seed and records always give the same split.

    Returns:
        A copy with ``split``, ``is_query`` and ``is_gallery`` reassigned.
    """
    parts = _check_fractions(fractions)
    require_columns(df, ("id", "label", "group"), "split_by_group")
    out = df.copy()
    sizes = out.groupby(["group", "label"], sort=True).size().reset_index(name="n")
    # a group's home class: its most frequent label, ties to the smallest label
    sizes = sizes.sort_values(["group", "n", "label"], ascending=[True, False, True], kind="stable")
    home = sizes.drop_duplicates("group", keep="first").set_index("group")["label"]
    group_size = out.groupby("group", sort=True).size()
    bounds = np.cumsum(parts)
    bounds[-1] = np.inf  # float round-off must not push the last midpoint past the end
    rng = np.random.default_rng(seed)
    assignment: dict[Hashable, str] = {}
    for _label, groups in home.groupby(home, sort=True):
        names = sorted(groups.index.tolist())
        weights = group_size.loc[names].to_numpy(dtype=np.float64)
        order = rng.permutation(len(names))
        ends = np.cumsum(weights[order])
        midpoints = (ends - weights[order] / 2.0) / ends[-1]
        for position, midpoint in zip(order, midpoints, strict=True):
            assignment[names[position]] = SPLITS[int(np.searchsorted(bounds, midpoint, side="right"))]
    out["split"] = out["group"].map(assignment)
    out = _reset_query_gallery(out)
    _warn_empty_splits(out, parts, "groups")
    logger.info(
        "split_by_group: %s images in train/val/test", [int((out["split"] == s).sum()) for s in SPLITS]
    )
    return out


def hold_out(
    df: pd.DataFrame,
    fraction: float,
    mode: ValMode,
    *,
    seed: int = 0,
    source: Split = "train",
    target: Split = "val",
) -> pd.DataFrame:
    """Move ``fraction`` of the ``source`` rows to ``target`` as ``mode`` says (open-set or closed-set validation).

    ``unseen_classes``: whole classes (classes linked by a shared group move together), at least 2 so that the
    held-out split can measure retrieval, and at least 2 left to train; ``unseen_groups``: whole groups within
    every class (:func:`split_by_group`); ``same_classes``: images within every class, groups ignored. Rows of
    other splits are unchanged; ``is_query``/``is_gallery`` of the moved rows are reset to all-vs-all.

    Args:
        df: validated records with a ``split`` column.
        fraction: share of the ``source`` rows (``unseen_classes``: of its classes) to move, in (0, 1).
        mode: one of :data:`VAL_MODES`.
        seed: the same seed and records always give the same choice.
        source: the split the rows are taken from.
        target: the split they go to.

    Returns:
        A copy with ``split`` (and the moved rows' ``is_query``/``is_gallery``) reassigned.

    Raises:
        DataError: an unknown mode, a fraction outside (0, 1), or too few classes for ``unseen_classes``.
    """
    if mode not in VAL_MODES:
        raise DataError(f"val_mode must be one of {list(VAL_MODES)}, got {mode!r}")
    if not 0.0 < fraction < 1.0:
        raise DataError(f"the share held out for {target!r} must be in (0, 1), got {fraction!r}; set "
                        f"data.val_fraction (or data.fractions) to e.g. 0.1")
    require_columns(df, ("id", "label", "group", "split"), "hold_out")
    part = df[df["split"] == source]
    if part.empty:
        raise DataError(f"no {source!r} rows to hold a {target!r} split out of; splits present: "
                        f"{sorted(df['split'].unique().tolist())}")
    if mode == "unseen_classes":
        n = int(part["label"].nunique())
        n_held = max(2, round(fraction * n))
        if n - n_held < 2:
            raise DataError(f"val_mode unseen_classes holds out whole classes: {target!r} needs 2+ classes and "
                            f"{source!r} keeps 2+, but {source!r} has {n} class(es); use val_mode unseen_groups or "
                            f"same_classes, or give the data more classes")
        moved = split_by_class(part, fractions=(1 - n_held / n, n_held / n, 0.0), seed=seed)
    elif mode == "unseen_groups":
        moved = split_by_group(part, fractions=(1 - fraction, fraction, 0.0), seed=seed)
    else:  # same_classes: every image its own group
        moved = split_by_group(part.assign(group=part["id"].astype(str)), fractions=(1 - fraction, fraction, 0.0),
                               seed=seed)
    out = df.copy()
    taken = moved.index[moved["split"] == "val"]
    out.loc[taken, "split"] = target
    if "is_query" in out:
        out.loc[taken, "is_query"] = True
        out.loc[taken, "is_gallery"] = True
    logger.info("hold_out (%s): %d of %d %r images (%d of %d classes) moved to %r", mode, len(taken), len(part),
                source, int(out.loc[taken, "label"].nunique()), int(part["label"].nunique()), target)
    return out


def assign_query_gallery(
    df: pd.DataFrame,
    *,
    split: Split | str = "val",
    query_fraction: float = 0.5,
    seed: int = 0,
    mode: QueryGalleryMode = "all_vs_all",
) -> pd.DataFrame:
    """Mark the queries and the gallery of one split for retrieval evaluation.

    ``"all_vs_all"``: every image is a query and a gallery item; a query is never matched with
    itself (leave-one-out). ``"holdout"``: in each class, ``round(n * query_fraction)`` images (at
    least one, and at least one fewer than ``n``) become queries and the rest gallery; a class with
    a single image goes to the gallery as a distractor. Rows of other splits are unchanged.

    Args:
        df: validated records.
        split: the split to mark.
        query_fraction: share of each class used as queries in ``"holdout"`` mode, in (0, 1).
        seed: the same seed and records always give the same choice.
        mode: ``"all_vs_all"`` or ``"holdout"``.

    Returns:
        A copy with ``is_query`` and ``is_gallery`` set for ``split``.

    Raises:
        DataError: the split has no records, or the mode or fraction is invalid.
    """
    require_columns(df, ("id", "label", "split"), "assign_query_gallery")
    if mode not in ("all_vs_all", "holdout"):
        raise DataError(f"mode must be 'all_vs_all' or 'holdout', got {mode!r}")
    if mode == "holdout" and not 0 < query_fraction < 1:
        raise DataError(f"query_fraction must be between 0 and 1 (exclusive), got {query_fraction}")
    out = df.copy()
    mask = (out["split"] == split).to_numpy()
    if not mask.any():
        raise DataError(
            f"split {split!r} has no records; splits present: {sorted(out['split'].unique().tolist())}; "
            "assign splits first with split_by_class() or split_by_group()"
        )
    default = (out["split"] != "train").to_numpy(dtype=bool, copy=True)
    is_query = out["is_query"].to_numpy(dtype=bool, copy=True) if "is_query" in out else default.copy()
    is_gallery = out["is_gallery"].to_numpy(dtype=bool, copy=True) if "is_gallery" in out else default
    if mode == "all_vs_all":
        is_query[mask] = True
        is_gallery[mask] = True
    else:
        rng = np.random.default_rng(seed)
        rows = np.flatnonzero(mask)
        labels = out["label"].to_numpy()[rows]
        singles = 0
        for label in sorted(set(labels.tolist())):
            members = rows[labels == label]
            members = members[rng.permutation(len(members))]
            if len(members) < 2:
                singles += 1
                n_query = 0
            else:
                n_query = min(max(1, round(len(members) * query_fraction)), len(members) - 1)
            is_query[members] = False
            is_gallery[members] = True
            is_query[members[:n_query]] = True
            is_gallery[members[:n_query]] = False
        if singles:
            logger.info("%d single-image class(es) in split %r are gallery-only distractors", singles, split)
    out["is_query"] = is_query
    out["is_gallery"] = is_gallery
    logger.info(
        "split %r (%s): %d queries, %d gallery items",
        split,
        mode,
        int(is_query[mask].sum()),
        int(is_gallery[mask].sum()),
    )
    return out



def sample_per_class(df: pd.DataFrame, n: int | None, *, seed: int = 0,
                     by: Sequence[str] = ("label",)) -> pd.DataFrame:
    """At most ``n`` random rows per class (per ``by`` combination), keeping the original row order.

    Deterministic for a seed; ``n=None`` returns ``df`` unchanged.
    """
    if not n:
        return df
    picked = df.sample(frac=1.0, random_state=seed).groupby(list(by), sort=False).head(n)
    return df.loc[df.index.isin(picked.index)]
