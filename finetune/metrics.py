"""Retrieval metrics: Recall@K, Precision@K, R-Precision, MAP@R and mAP, as plain typed functions.

Every query is ranked against the whole gallery, the usual protocol of deep metric learning
benchmarks (CUB, Cars196, Stanford Online Products, In-Shop). The similarity matrix is never built
whole: queries are scored in chunks against the gallery, each chunk's rows are sorted, and the
per-query values are summed, so memory is O(chunk x gallery), not O(queries x gallery). Results do not
depend on the chunk size.

Definitions, for one query with ``R`` relevant gallery items (same label, not excluded) and
``rel(i) = 1`` when the item at rank ``i`` (1-based) is relevant, ``P(i) = (1/i) sum_{j<=i} rel(j)``:

* ``recall_at_k``: 1 if at least one relevant item is in the top ``k``, else 0 (the "Recall@K" of metric
  learning papers, e.g. Song et al. 2016, "Deep Metric Learning via Lifted Structured Feature
  Embedding"; the CMC curve at ``k`` of re-identification). Not the IR recall ``hits/R``.
* ``precision_at_k``: ``(1/k) sum_{i<=k} rel(i)`` (Manning, Raghavan & Schütze 2008, "Introduction to
  Information Retrieval", §8.4). OML divides by ``min(k, R)`` instead; we keep the textbook one.
* ``r_precision``: ``precision_at_R`` (Musgrave, Belongie & Lim 2020, "A Metric Learning Reality Check").
* ``map_at_r``: ``(1/R) sum_{i<=R} P(i) rel(i)`` (Musgrave et al. 2020).
* ``map``: average precision over the whole ranked gallery, ``(1/R) sum_{i<=n_gallery} P(i) rel(i)``
  (Manning et al. 2008, §8.4), averaged over queries.

Keys say ``_at_`` rather than ``@`` so that they are valid metric names for every Lightning logger
(MLflow rejects ``@``) and can be monitored as ``val/map_at_r``.

Each value is the mean over the queries that have at least one relevant item; queries without one are
counted in ``n_queries_without_positive``, logged as a warning and left out of every mean. Ties in
similarity are broken by gallery order (a stable sort).
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
import torch.nn.functional as F

from deepfeat.finetune.errors import DataError

log = logging.getLogger(__name__)

Metric = Literal["cosine", "euclidean"]
EmbeddingsLike = np.ndarray | torch.Tensor
KeysLike = np.ndarray | torch.Tensor | pd.Series | Sequence[str] | Sequence[int]

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
COUNT_KEYS: tuple[str, ...] = ("n_queries", "n_gallery", "n_queries_without_positive")
DEFAULT_TABLE_KEYS: tuple[str, ...] = (
    "recall_at_1",
    "recall_at_5",
    "recall_at_10",
    "precision_at_5",
    "map_at_r",
    "map",
)
RECORD_COLUMNS: tuple[str, ...] = ("is_query", "is_gallery", "label", "id")

# One chunk's working set is ~20 bytes per (query, gallery) pair: scores (4), the argsort's values and
# int64 indices (12), boolean masks, int32 hit counts and float32 precisions. The chunk is shrunk to keep
# that under this budget, so a 100k gallery runs in a few hundred MB whatever chunk_size asks for.
_BYTES_PER_PAIR = 20
_CHUNK_BUDGET_BYTES = 256 * 2**20


def retrieval_metrics(
    query_emb: EmbeddingsLike,
    query_labels: KeysLike,
    gallery_emb: EmbeddingsLike,
    gallery_labels: KeysLike,
    *,
    query_ids: KeysLike | None = None,
    gallery_ids: KeysLike | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    metric: Metric = "cosine",
    chunk_size: int = 1024,
    exclude_same_id: bool = True,
    query_groups: KeysLike | None = None,
    gallery_groups: KeysLike | None = None,
    exclude_same_group: bool = False,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Rank the gallery for every query and return the retrieval metrics defined in the module docstring.

    Args:
        query_emb: ``(n_queries, dim)`` float array or tensor.
        query_labels: ``n_queries`` labels (str or int); a gallery item is relevant to a query when
            their labels are equal. Int and str labels are compared as str when the two sides differ.
        gallery_emb: ``(n_gallery, dim)`` float array or tensor.
        gallery_labels: ``n_gallery`` labels.
        query_ids: ids of the queries; with ``gallery_ids`` and ``exclude_same_id``, a gallery item with
            the query's own id is removed from that query's ranking (leave-one-out, for a query that is
            also in the gallery). Give both or neither.
        gallery_ids: ids of the gallery items.
        ks: the cut-offs of ``recall_at_k`` and ``precision_at_k``; positive ints.
        metric: ``cosine`` (higher cosine similarity ranks first) or ``euclidean`` (smaller L2 distance
            ranks first). On L2-normalised vectors both give the same ranking.
        chunk_size: most queries scored at once. It is lowered automatically so that one chunk stays
            within ~256 MiB (about 20 bytes per query-gallery pair); the results are the same for any value.
        exclude_same_id: apply the leave-one-out exclusion above.
        query_groups: group of each query (patient id, product id); used with ``exclude_same_group``.
        gallery_groups: group of each gallery item.
        exclude_same_group: remove every gallery item of the query's group from its ranking (e.g. other
            images of the same patient), so that a match must come from another group.
        device: where to compute; ``None`` uses the device of ``query_emb`` when it is a tensor, else CPU.

    Returns:
        A flat dict: ``recall_at_k`` and ``precision_at_k`` for each ``k`` in ``ks``, ``r_precision``,
        ``map_at_r``, ``map`` (floats in [0, 1]; NaN when no query has a relevant item), and the counts
        ``n_queries``, ``n_gallery``, ``n_queries_without_positive`` (ints).

    Raises:
        DataError: embeddings that are not 2-D, of different widths, empty, or with NaN/inf values;
            labels, ids or groups whose length does not match their embeddings; missing labels; invalid
            ``ks``, ``metric`` or ``chunk_size``; ids or groups given on one side only.
    """
    inputs = _prepare_inputs(
        query_emb,
        query_labels,
        gallery_emb,
        gallery_labels,
        query_ids=query_ids,
        gallery_ids=gallery_ids,
        ks=ks,
        metric=metric,
        chunk_size=chunk_size,
        exclude_same_id=exclude_same_id,
        query_groups=query_groups,
        gallery_groups=gallery_groups,
        exclude_same_group=exclude_same_group,
        device=device,
    )
    ks, q, g, device, dtype = inputs.ks, inputs.q, inputs.g, inputs.device, inputs.dtype
    n_q, n_g = q.shape[0], g.shape[0]
    q_lab, g_lab, q_id, g_id, q_grp, g_grp = (
        inputs.q_lab, inputs.g_lab, inputs.q_id, inputs.g_id, inputs.q_grp, inputs.g_grp
    )

    g = g.to(device=device, dtype=dtype)
    if metric == "cosine":
        g = F.normalize(g, dim=1)
    # -||q-g||^2 = 2 q.g - ||g||^2 - ||q||^2; the last term is constant along a row, so it cannot change
    # the ranking and is left out.
    g_sq_neg = -(g * g).sum(dim=1) if metric == "euclidean" else None
    g_t = g.T.contiguous()
    ranks = torch.arange(1, n_g + 1, device=device, dtype=torch.float32)

    step = _effective_chunk_size(chunk_size, n_g)
    sums: dict[str, float] = {}
    n_evaluated = 0
    for start in range(0, n_q, step):
        stop = min(start + step, n_q)
        q_chunk = q[start:stop].to(device=device, dtype=dtype)
        if g_sq_neg is None:
            scores = F.normalize(q_chunk, dim=1) @ g_t
        else:
            scores = torch.addmm(g_sq_neg, q_chunk, g_t, alpha=2.0)
        excluded = _exclusion_mask(q_id, g_id, q_grp, g_grp, start, stop)
        relevant = q_lab[start:stop, None] == g_lab[None, :]
        if excluded is not None:
            relevant &= ~excluded
            # Excluded items still take rank positions unless they are pushed past every other item.
            scores.masked_fill_(excluded, -math.inf)
            del excluded
        chunk_sums = _rank_and_score(scores, relevant, ranks, ks)
        del scores, relevant
        n_evaluated += int(chunk_sums.pop("_n"))
        for key, value in chunk_sums.items():
            sums[key] = sums.get(key, 0.0) + value

    n_without = n_q - n_evaluated
    if n_without:
        exclusions = []
        if q_id is not None:
            exclusions.append("the query's own id")
        if q_grp is not None:
            exclusions.append("the query's group")
        after = f" after excluding {' and '.join(exclusions)}" if exclusions else ""
        log.warning(
            "%d of %d queries have no item of their label in the gallery%s; they are left out of "
            "recall, precision, MAP@R and mAP",
            n_without,
            n_q,
            after,
        )

    result: dict[str, float] = {}
    for key in _metric_keys(ks):
        result[key] = sums.get(key, 0.0) / n_evaluated if n_evaluated else math.nan
    result["n_queries"] = n_q
    result["n_gallery"] = n_g
    result["n_queries_without_positive"] = n_without
    return result


def retrieval_metrics_from_records(
    emb: EmbeddingsLike,
    records_df: pd.DataFrame,
    split: str | None = None,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    metric: Metric = "cosine",
    chunk_size: int = 1024,
    exclude_same_group: bool = False,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """:func:`retrieval_metrics` on a records table (see ``docs/contracts.md``) aligned with ``emb``.

    Row ``i`` of ``emb`` is the embedding of row ``i`` of ``records_df`` (by position). Queries are the
    rows with ``is_query``, the gallery the rows with ``is_gallery``; a row that is both is left out of
    its own ranking through its ``id``. The ``group`` column (``id`` when absent) drives
    ``exclude_same_group``, which stays off by default because a group can coincide with the label
    (a product id used as the class), and then every positive would be excluded.

    Args:
        emb: ``(len(records_df), dim)`` embeddings.
        records_df: a table with columns ``is_query``, ``is_gallery``, ``label``, ``id`` and optionally
            ``group`` and ``split``.
        split: keep only the rows of this split (``train``, ``val`` or ``test``); ``None`` keeps all.
        ks: as in :func:`retrieval_metrics`.
        metric: as in :func:`retrieval_metrics`.
        chunk_size: as in :func:`retrieval_metrics`.
        exclude_same_group: as in :func:`retrieval_metrics`.
        device: as in :func:`retrieval_metrics`.

    Raises:
        DataError: missing columns, ``emb`` not aligned with the table, or a split with no rows.
    """
    missing = [c for c in RECORD_COLUMNS if c not in records_df.columns]
    if split is not None and "split" not in records_df.columns:
        missing.append("split")
    if missing:
        raise DataError(
            f"the records table lacks the column(s) {missing} needed for retrieval metrics; "
            f"it has {list(records_df.columns)}"
        )
    n_emb = int(emb.shape[0]) if emb.ndim >= 1 else 0
    if n_emb != len(records_df):
        raise DataError(
            f"emb has {n_emb} rows (shape {tuple(emb.shape)}) but records_df has "
            f"{len(records_df)}; pass the embeddings of exactly these records, in order"
        )

    keep = np.ones(len(records_df), dtype=bool)
    if split is not None:
        keep = (records_df["split"] == split).to_numpy(dtype=bool)
        if not keep.any():
            found = sorted(map(str, records_df["split"].unique()))
            raise DataError(f"no records in split {split!r}; the table has splits {found}")
    is_query = keep & _bool_column(records_df, "is_query")
    is_gallery = keep & _bool_column(records_df, "is_gallery")
    groups = records_df["group"] if "group" in records_df.columns else records_df["id"]

    def take(x: EmbeddingsLike, mask: np.ndarray) -> EmbeddingsLike:
        return x[torch.from_numpy(mask)] if isinstance(x, torch.Tensor) else x[mask]

    def col(values: pd.Series, mask: np.ndarray) -> np.ndarray:
        return values.to_numpy()[mask]

    return retrieval_metrics(
        take(emb, is_query),
        col(records_df["label"], is_query),
        take(emb, is_gallery),
        col(records_df["label"], is_gallery),
        query_ids=col(records_df["id"], is_query),
        gallery_ids=col(records_df["id"], is_gallery),
        query_groups=col(groups, is_query),
        gallery_groups=col(groups, is_gallery),
        exclude_same_group=exclude_same_group,
        ks=ks,
        metric=metric,
        chunk_size=chunk_size,
        device=device,
    )


def format_metrics_table(
    rows: Mapping[str, Mapping[str, float]],
    keys: Sequence[str] | None = DEFAULT_TABLE_KEYS,
    *,
    delta: bool = False,
    digits: int = 4,
) -> str:
    """A plain-text table, one row per model (``off-the-shelf``, ``fine-tuned``) and one column per key.

    Args:
        rows: row name -> metrics dict, as returned by :func:`retrieval_metrics`, in display order.
        keys: the columns; ``None`` shows every key found in the rows, in order of first appearance.
            A key a row lacks, or a NaN, shows as ``-``. Counts (``n_*``) are shown as integers.
        delta: add a row ``delta`` = last row minus first row (e.g. fine-tuned minus off-the-shelf).
        digits: decimals of the metric values.

    Raises:
        DataError: no rows, or ``delta`` with fewer than two rows.
    """
    if not rows:
        raise DataError("format_metrics_table needs at least one row; received none")
    names = list(rows)
    if keys is None:
        keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    table: list[list[str]] = [["", *keys]]
    for name in names:
        table.append([name, *(_format_value(k, rows[name].get(k), digits, signed=False) for k in keys)])
    if delta:
        if len(names) < 2:
            raise DataError(f"delta=True needs two rows to compare; received only {names}")
        first, last = rows[names[0]], rows[names[-1]]
        table.append(
            [
                "delta",
                *(
                    _format_value(k, _difference(first.get(k), last.get(k)), digits, signed=True)
                    for k in keys
                ),
            ]
        )
    widths = [max(len(cell) for cell in column) for column in zip(*table, strict=True)]
    lines = []
    for line in table:
        cells = [line[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
    return "\n".join(line.rstrip() for line in lines)


@dataclass(frozen=True)
class _Inputs:
    """The checked embeddings and the encoded labels, ids and groups of :func:`retrieval_metrics`."""

    ks: tuple[int, ...]
    q: torch.Tensor
    g: torch.Tensor
    device: torch.device
    dtype: torch.dtype
    q_lab: torch.Tensor
    g_lab: torch.Tensor
    q_id: torch.Tensor | None
    g_id: torch.Tensor | None
    q_grp: torch.Tensor | None
    g_grp: torch.Tensor | None


def _prepare_inputs(
    query_emb: EmbeddingsLike,
    query_labels: KeysLike,
    gallery_emb: EmbeddingsLike,
    gallery_labels: KeysLike,
    *,
    query_ids: KeysLike | None,
    gallery_ids: KeysLike | None,
    ks: Sequence[int],
    metric: Metric,
    chunk_size: int,
    exclude_same_id: bool,
    query_groups: KeysLike | None,
    gallery_groups: KeysLike | None,
    exclude_same_group: bool,
    device: str | torch.device | None,
) -> _Inputs:
    """Check the arguments of :func:`retrieval_metrics` and encode its labels, ids and groups."""
    ks_checked = _check_ks(ks)
    if metric not in ("cosine", "euclidean"):
        raise DataError(f"unknown metric {metric!r}; choose 'cosine' or 'euclidean'")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise DataError(f"chunk_size must be a positive int; received {chunk_size!r}")

    q = _as_embeddings(query_emb, "query_emb")
    g = _as_embeddings(gallery_emb, "gallery_emb")
    if g.shape[0] == 0:
        raise DataError(
            "the gallery is empty (gallery_emb has shape "
            f"{tuple(g.shape)}); retrieval needs at least one gallery item: check is_gallery"
        )
    if q.shape[0] == 0:
        raise DataError(
            f"there are no queries (query_emb has shape {tuple(q.shape)}); "
            "retrieval needs at least one query: check is_query"
        )
    if q.shape[1] != g.shape[1]:
        raise DataError(
            f"query and gallery embeddings differ in width: query_emb {tuple(q.shape)}, "
            f"gallery_emb {tuple(g.shape)}; embed both with the same model"
        )
    n_q, n_g = q.shape[0], g.shape[0]
    if device is None:
        device = query_emb.device if isinstance(query_emb, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    dtype = torch.promote_types(q.dtype, g.dtype)
    q_lab, g_lab = _encode_pair(query_labels, gallery_labels, n_q, n_g, "labels", device)
    q_id = g_id = q_grp = g_grp = None
    if (query_ids is None) != (gallery_ids is None):
        raise DataError(
            "give both query_ids and gallery_ids, or neither; received only "
            + ("query_ids" if query_ids is not None else "gallery_ids")
        )
    if exclude_same_id and query_ids is not None and gallery_ids is not None:
        q_id, g_id = _encode_pair(query_ids, gallery_ids, n_q, n_g, "ids", device)
    if exclude_same_group:
        if query_groups is None or gallery_groups is None:
            raise DataError(
                "exclude_same_group=True needs both query_groups and gallery_groups; received "
                f"query_groups={'set' if query_groups is not None else None}, "
                f"gallery_groups={'set' if gallery_groups is not None else None}"
            )
        q_grp, g_grp = _encode_pair(query_groups, gallery_groups, n_q, n_g, "groups", device)
    return _Inputs(ks_checked, q, g, device, dtype, q_lab, g_lab, q_id, g_id, q_grp, g_grp)


def _metric_keys(ks: Sequence[int]) -> list[str]:
    return (
        [f"recall_at_{k}" for k in ks]
        + [f"precision_at_{k}" for k in ks]
        + ["r_precision", "map_at_r", "map"]
    )


def _rank_and_score(
    scores: torch.Tensor, relevant: torch.Tensor, ranks: torch.Tensor, ks: Sequence[int]
) -> dict[str, float]:
    """Sums over the chunk's queries of every per-query metric, plus ``_n``, the queries evaluated."""
    n_pos = relevant.sum(dim=1)
    has_pos = n_pos > 0
    if not bool(has_pos.all()):
        # Queries without a positive are skipped: no sort for them.
        scores, relevant, n_pos = scores[has_pos], relevant[has_pos], n_pos[has_pos]
    n = int(n_pos.shape[0])
    if n == 0:
        return {"_n": 0.0}
    n_g = scores.shape[1]
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    rel = torch.gather(relevant, 1, order)
    del order
    hits = rel.cumsum(dim=1, dtype=torch.int32)  # hits[:, i-1] = number of relevant items in the top i
    precision_at_hit = torch.where(rel, hits.to(torch.float32) / ranks, 0.0)  # P(i) rel(i)
    n_pos_f = n_pos.to(torch.float32)

    out: dict[str, float] = {"_n": float(n)}
    out["map"] = float((precision_at_hit.sum(dim=1) / n_pos_f).double().sum())
    within_r = ranks[None, :] <= n_pos_f[:, None]
    out["map_at_r"] = float(
        (precision_at_hit.masked_fill_(~within_r, 0.0).sum(dim=1) / n_pos_f).double().sum()
    )
    hits_at_r = hits.gather(1, (n_pos - 1).clamp(max=n_g - 1)[:, None]).squeeze(1)
    out["r_precision"] = float((hits_at_r.double() / n_pos.double()).sum())
    for k in ks:
        hits_at_k = hits[:, min(k, n_g) - 1]
        out[f"recall_at_{k}"] = float((hits_at_k > 0).sum())
        out[f"precision_at_{k}"] = float(hits_at_k.double().sum() / k)
    return out


def _exclusion_mask(
    q_id: torch.Tensor | None,
    g_id: torch.Tensor | None,
    q_grp: torch.Tensor | None,
    g_grp: torch.Tensor | None,
    start: int,
    stop: int,
) -> torch.Tensor | None:
    mask = None
    if q_id is not None and g_id is not None:
        mask = q_id[start:stop, None] == g_id[None, :]
    if q_grp is not None and g_grp is not None:
        same_group = q_grp[start:stop, None] == g_grp[None, :]
        mask = same_group if mask is None else mask | same_group
    return mask


def _effective_chunk_size(chunk_size: int, n_gallery: int) -> int:
    by_budget = max(1, _CHUNK_BUDGET_BYTES // (_BYTES_PER_PAIR * max(n_gallery, 1)))
    if by_budget < chunk_size:
        log.debug(
            "chunk_size %d lowered to %d for a gallery of %d to stay within %d MiB",
            chunk_size,
            by_budget,
            n_gallery,
            _CHUNK_BUDGET_BYTES // 2**20,
        )
    return min(chunk_size, by_budget)


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    try:
        values = tuple(ks)
    except TypeError:
        raise DataError(
            f"ks must be a sequence of positive ints such as (1, 5, 10); received {ks!r}"
        ) from None
    bad = [k for k in values if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1]
    if not values or bad:
        raise DataError(
            f"ks must be a non-empty sequence of positive ints such as (1, 5, 10); received {ks!r}"
        )
    return tuple(dict.fromkeys(int(k) for k in values))


def _as_embeddings(x: Any, name: str) -> torch.Tensor:
    """A 2-D float tensor (float64 kept, other dtypes to float32), checked finite."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        arr = np.asarray(x)
        if arr.dtype.kind not in "biuf":
            raise DataError(f"{name} must hold numbers; received an array of dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.ndim != 2:
        raise DataError(
            f"{name} must be 2-D (n, dim); received shape {tuple(t.shape)}"
            + ("; for one vector use x.reshape(1, -1)" if t.ndim == 1 else "")
        )
    if t.is_complex():
        raise DataError(f"{name} must be real; received dtype {t.dtype}")
    if t.dtype != torch.float64:
        t = t.to(torch.float32)
    bad_rows = (~torch.isfinite(t)).any(dim=1)
    if bool(bad_rows.any()):
        rows = torch.nonzero(bad_rows).flatten()
        shown = rows[:5].tolist()
        raise DataError(
            f"{name} has NaN or inf values in {rows.numel()} of {t.shape[0]} rows "
            f"(first: {shown}); re-embed those images or drop them before evaluating"
        )
    return t


def _as_keys(x: Any, name: str, expected: int) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim != 1 or arr.shape[0] != expected:
        raise DataError(
            f"{name} must be 1-D with one entry per embedding row ({expected}); received shape {arr.shape}"
        )
    n_missing = int(pd.isna(arr).sum()) if arr.dtype.kind in "fOSU" else 0
    if n_missing:
        raise DataError(f"{name} has {n_missing} missing values (None/NaN); every row needs one")
    return arr


def _encode_pair(
    query_keys: Any, gallery_keys: Any, n_q: int, n_g: int, what: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared integer codes for query and gallery keys (labels, ids or groups), so equality is an int
    comparison on the device."""
    q = _as_keys(query_keys, f"query_{what}", n_q)
    g = _as_keys(gallery_keys, f"gallery_{what}", n_g)
    if q.dtype.kind in "biu" and g.dtype.kind in "biu":
        both: np.ndarray = np.concatenate([q.astype(np.int64), g.astype(np.int64)])
    elif q.dtype.kind in "biuf" and g.dtype.kind in "biuf":
        both = np.concatenate([q.astype(np.float64), g.astype(np.float64)])
    else:
        if (q.dtype.kind in "biuf") != (g.dtype.kind in "biuf"):
            log.warning(
                "query_%s are %s but gallery_%s are %s; comparing them as strings",
                what,
                q.dtype,
                what,
                g.dtype,
            )
        both = np.concatenate([q.astype(str), g.astype(str)])
    codes, _ = pd.factorize(both)
    codes_t = torch.from_numpy(codes.astype(np.int64)).to(device)
    return codes_t[:n_q], codes_t[n_q:]


def _bool_column(df: pd.DataFrame, column: str) -> np.ndarray:
    values = df[column]
    if values.isna().any():
        raise DataError(
            f"column {column!r} has {int(values.isna().sum())} missing values; "
            "set it to True or False on every row"
        )
    return values.to_numpy(dtype=bool)


def _difference(before: float | None, after: float | None) -> float | None:
    if before is None or after is None:
        return None
    return float(after) - float(before)


def _format_value(key: str, value: float | None, digits: int, *, signed: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key in COUNT_KEYS or key.startswith("n_"):
        return f"{int(value):+d}" if signed else f"{int(value):d}"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
