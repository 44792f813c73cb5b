"""Tests of deepfeat.finetune.metrics: hand-computed cases, a naive full-matrix reference, exclusions."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch

from deepfeat.finetune import metrics as metrics_module
from deepfeat.finetune.errors import DataError
from deepfeat.finetune.metrics import (
    format_metrics_table,
    retrieval_metrics,
    retrieval_metrics_from_records,
)

KS = (1, 2, 5, 10)

# --- the hand-computed example ------------------------------------------------------------------------
# Gallery on a line, x = 0..4, labels a b a b a. Queries: x=0.1 (a), x=3.9 (b), x=2.0 (c, no positive).
#
# q0 (a) ranks x = 0,1,2,3,4 -> rel = 1 0 1 0 1, R = 3.
#    AP    = (1/1 + 2/3 + 3/5) / 3 = 0.755556     MAP@R = (1/1 + 2/3) / 3 = 0.555556
#    R-precision = 2/3; P@1 = 1, P@2 = 1/2, P@5 = 3/5, P@10 = 3/10; recall@k = 1 for every k.
# q1 (b) ranks x = 4,3,2,1,0 -> rel = 0 1 0 1 0, R = 2.
#    AP    = (1/2 + 2/4) / 2 = 0.5                MAP@R = (1/2) / 2 = 0.25
#    R-precision = 1/2; P@1 = 0, P@2 = 1/2, P@5 = 2/5, P@10 = 2/10; recall@1 = 0, recall@2.. = 1.
# q2 (c) has no positive: skipped, counted.
# Means over q0, q1:
HAND_EXPECTED = {
    "recall_at_1": 0.5,
    "recall_at_2": 1.0,
    "recall_at_5": 1.0,
    "recall_at_10": 1.0,
    "precision_at_1": 0.5,
    "precision_at_2": 0.5,
    "precision_at_5": 0.5,
    "precision_at_10": 0.25,
    "r_precision": (2 / 3 + 1 / 2) / 2,
    "map_at_r": ((1 + 2 / 3) / 3 + 0.25) / 2,
    "map": ((1 + 2 / 3 + 3 / 5) / 3 + 0.5) / 2,
    "n_queries": 3,
    "n_gallery": 5,
    "n_queries_without_positive": 1,
}
GALLERY_X = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
GALLERY_LABELS = ["a", "b", "a", "b", "a"]
QUERY_X = np.array([0.1, 3.9, 2.0])
QUERY_LABELS = ["a", "b", "c"]


def _on_line(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, 1).astype(np.float32)


def _on_arc(x: np.ndarray) -> np.ndarray:
    """Points on the unit circle, 20 degrees per unit of x: cosine ranks them as x ranks on the line."""
    angle = np.deg2rad(20.0 * x)
    return np.stack([np.cos(angle), np.sin(angle)], axis=1).astype(np.float32)


def _assert_metrics(got: dict[str, float], expected: dict[str, float]) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, abs=1e-6), key


# --- the naive reference: full matrix, float64, one python loop per query -----------------------------


def naive_metrics(
    q: np.ndarray,
    ql: np.ndarray,
    g: np.ndarray,
    gl: np.ndarray,
    ks: tuple[int, ...],
    metric: str,
    qid: np.ndarray | None = None,
    gid: np.ndarray | None = None,
    qgrp: np.ndarray | None = None,
    ggrp: np.ndarray | None = None,
) -> dict[str, float]:
    q = q.astype(np.float64)
    g = g.astype(np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        scores = q @ g.T
    else:
        scores = -((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    sums: dict[str, float] = {}
    n_eval = 0
    for i in range(len(q)):
        keep = np.ones(len(g), dtype=bool)
        if qid is not None and gid is not None:
            keep &= gid != qid[i]
        if qgrp is not None and ggrp is not None:
            keep &= ggrp != qgrp[i]
        candidates = np.flatnonzero(keep)
        ranked = candidates[np.argsort(-scores[i, candidates], kind="stable")]
        rel = (gl[ranked] == ql[i]).astype(float)
        r = int(rel.sum())
        if r == 0:
            continue
        n_eval += 1
        precision_at = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        values = {
            "map": float((precision_at * rel).sum() / r),
            "map_at_r": float((precision_at[:r] * rel[:r]).sum() / r),
            "r_precision": float(rel[:r].sum() / r),
        }
        for k in ks:
            values[f"recall_at_{k}"] = float(rel[:k].sum() > 0)
            values[f"precision_at_{k}"] = float(rel[:k].sum() / k)
        for key, v in values.items():
            sums[key] = sums.get(key, 0.0) + v
    keys = (
        [f"recall_at_{k}" for k in ks]
        + [f"precision_at_{k}" for k in ks]
        + ["r_precision", "map_at_r", "map"]
    )
    out: dict[str, float] = {k: sums[k] / n_eval if n_eval else math.nan for k in keys}
    out["n_queries"] = len(q)
    out["n_gallery"] = len(g)
    out["n_queries_without_positive"] = len(q) - n_eval
    return out


def _random_problem(seed: int, n_q: int = 37, n_g: int = 53, dim: int = 6, n_labels: int = 5) -> dict:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_labels + 1, dim))
    gl = rng.integers(0, n_labels, size=n_g)
    ql = rng.integers(0, n_labels + 1, size=n_q)  # label n_labels is absent from the gallery
    g = (centres[gl] + rng.normal(scale=1.5, size=(n_g, dim))).astype(np.float32)
    q = (centres[ql] + rng.normal(scale=1.5, size=(n_q, dim))).astype(np.float32)
    # the first 15 queries are also gallery items (same id, same vector, same label)
    q[:15], ql[:15] = g[:15], gl[:15]
    gid = np.array([f"img{i}" for i in range(n_g)])
    qid = np.concatenate([gid[:15], [f"query{i}" for i in range(n_q - 15)]])
    ggrp = rng.integers(0, 12, size=n_g).astype(str)
    qgrp = np.concatenate([ggrp[:15], rng.integers(0, 12, size=n_q - 15).astype(str)])
    return {"q": q, "ql": ql, "g": g, "gl": gl, "qid": qid, "gid": gid, "qgrp": qgrp, "ggrp": ggrp}


# --- hand-computed ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("metric", "embed"), [("euclidean", _on_line), ("cosine", _on_arc)])
def test_hand_computed_example(metric: str, embed) -> None:
    got = retrieval_metrics(
        embed(QUERY_X), QUERY_LABELS, embed(GALLERY_X), GALLERY_LABELS, ks=(1, 2, 5, 10), metric=metric
    )
    _assert_metrics(got, HAND_EXPECTED)


def test_hand_computed_example_matches_naive_reference() -> None:
    naive = naive_metrics(
        _on_line(QUERY_X),
        np.array(QUERY_LABELS),
        _on_line(GALLERY_X),
        np.array(GALLERY_LABELS),
        KS,
        "euclidean",
    )
    _assert_metrics(naive, HAND_EXPECTED)


def test_default_keys() -> None:
    got = retrieval_metrics(_on_line(QUERY_X), QUERY_LABELS, _on_line(GALLERY_X), GALLERY_LABELS)
    assert list(got) == [
        "recall_at_1",
        "recall_at_5",
        "recall_at_10",
        "precision_at_1",
        "precision_at_5",
        "precision_at_10",
        "r_precision",
        "map_at_r",
        "map",
        "n_queries",
        "n_gallery",
        "n_queries_without_positive",
    ]


def test_perfect_and_worst_rankings() -> None:
    # Two well-separated clusters: every query finds only its own label first.
    g = np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1]], dtype=np.float32)
    labels = ["x", "x", "y", "y"]
    perfect = retrieval_metrics(g, labels, g, labels, query_ids=[0, 1, 2, 3], gallery_ids=[0, 1, 2, 3])
    assert perfect["map"] == perfect["map_at_r"] == perfect["recall_at_1"] == perfect["r_precision"] == 1.0
    assert perfect["precision_at_5"] == pytest.approx(1 / 5)  # one positive per query, divided by k
    # Gallery x = 0 (a), 1 (b), 2 (c). Query x=0 (c) ranks a b c, query x=2 (a) ranks c b a: the only
    # positive is last, so AP = 1/3, MAP@R = R-precision = recall@1 = 0, recall@3 = 1.
    worst = retrieval_metrics(
        _on_line(np.array([0.0, 2.0])),
        ["c", "a"],
        _on_line(np.array([0.0, 1.0, 2.0])),
        ["a", "b", "c"],
        metric="euclidean",
        ks=(1, 3),
    )
    assert worst["map"] == pytest.approx(1 / 3)
    assert worst["map_at_r"] == worst["recall_at_1"] == worst["r_precision"] == 0.0
    assert worst["recall_at_3"] == 1.0


# --- agreement with the naive reference ---------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 2, 7, 16, 37, 1000])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("exclusion", ["none", "id", "group"])
def test_agrees_with_naive_reference(chunk_size: int, metric: str, exclusion: str) -> None:
    p = _random_problem(seed=chunk_size)
    kwargs: dict = {}
    ref_kwargs: dict = {}
    if exclusion in ("id", "group"):
        kwargs.update(query_ids=p["qid"], gallery_ids=p["gid"])
        ref_kwargs.update(qid=p["qid"], gid=p["gid"])
    if exclusion == "group":
        kwargs.update(query_groups=p["qgrp"], gallery_groups=p["ggrp"], exclude_same_group=True)
        ref_kwargs.update(qgrp=p["qgrp"], ggrp=p["ggrp"])
    got = retrieval_metrics(
        p["q"], p["ql"], p["g"], p["gl"], ks=KS, metric=metric, chunk_size=chunk_size, **kwargs
    )
    expected = naive_metrics(p["q"], p["ql"], p["g"], p["gl"], KS, metric, **ref_kwargs)
    assert expected["n_queries_without_positive"] > 0  # the problem exercises the skip
    _assert_metrics(got, expected)


def test_results_do_not_depend_on_chunk_size_or_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    p = _random_problem(seed=3, n_q=64, n_g=200)
    reference = retrieval_metrics(p["q"], p["ql"], p["g"], p["gl"], query_ids=p["qid"], gallery_ids=p["gid"])
    # A tiny budget forces one query per chunk whatever chunk_size says.
    monkeypatch.setattr(metrics_module, "_CHUNK_BUDGET_BYTES", 1)
    assert metrics_module._effective_chunk_size(1024, 200) == 1
    squeezed = retrieval_metrics(p["q"], p["ql"], p["g"], p["gl"], query_ids=p["qid"], gallery_ids=p["gid"])
    _assert_metrics(squeezed, reference)


def test_chunk_budget_for_a_large_gallery() -> None:
    rows = metrics_module._effective_chunk_size(1024, 100_000)
    assert 1 <= rows < 1024
    assert rows * 100_000 * metrics_module._BYTES_PER_PAIR <= 256 * 2**20
    assert metrics_module._effective_chunk_size(16, 100) == 16


def test_torch_inputs_and_int_labels_match_numpy() -> None:
    p = _random_problem(seed=11)
    from_numpy = retrieval_metrics(p["q"], p["ql"], p["g"], p["gl"])
    from_torch = retrieval_metrics(
        torch.from_numpy(p["q"]),
        torch.from_numpy(p["ql"]),
        torch.from_numpy(p["g"]).double(),
        torch.from_numpy(p["gl"]),
    )
    as_str = retrieval_metrics(p["q"], p["ql"].astype(str), p["g"], [str(x) for x in p["gl"]])
    _assert_metrics(from_torch, from_numpy)
    _assert_metrics(as_str, from_numpy)


def test_int_query_labels_match_str_gallery_labels(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="deepfeat.finetune.metrics"):
        got = retrieval_metrics(
            _on_line(QUERY_X[:2]), [0, 1], _on_line(GALLERY_X), ["0", "1", "0", "1", "0"], metric="euclidean"
        )
    assert "comparing them as strings" in caplog.text
    assert got["map"] == pytest.approx(HAND_EXPECTED["map"])


# --- cosine vs euclidean ------------------------------------------------------------------------------


def test_cosine_and_euclidean_agree_on_normalised_vectors() -> None:
    p = _random_problem(seed=5, n_q=50, n_g=120, dim=16)
    q = p["q"] / np.linalg.norm(p["q"], axis=1, keepdims=True)
    g = p["g"] / np.linalg.norm(p["g"], axis=1, keepdims=True)
    cos = retrieval_metrics(q, p["ql"], g, p["gl"], query_ids=p["qid"], gallery_ids=p["gid"], metric="cosine")
    euc = retrieval_metrics(
        q, p["ql"], g, p["gl"], query_ids=p["qid"], gallery_ids=p["gid"], metric="euclidean"
    )
    _assert_metrics(euc, cos)


def test_cosine_and_euclidean_differ_on_unnormalised_vectors() -> None:
    # Same direction, different lengths: cosine sees ties, euclidean sees the nearer point.
    g = np.array([[1.0, 0.0], [10.0, 0.0]], dtype=np.float32)
    q = np.array([[9.0, 0.0]], dtype=np.float32)
    cos = retrieval_metrics(q, ["b"], g, ["a", "b"], metric="cosine", ks=(1,))
    euc = retrieval_metrics(q, ["b"], g, ["a", "b"], metric="euclidean", ks=(1,))
    assert cos["recall_at_1"] == 0.0  # a tie, broken by gallery order
    assert euc["recall_at_1"] == 1.0


# --- exclusions ---------------------------------------------------------------------------------------


def test_leave_one_out_excludes_the_query_itself() -> None:
    # Gallery x = 0, 1, 5, 6 with labels a b a b; every item is also a query.
    # Without exclusion each query finds itself at rank 1. With it, x=0 ranks 1(b), 5(a), 6(b):
    # AP = (1/2)/1; x=1 ranks 0(a), 5(a), 6(b): AP = (1/3)/1; x=5 ranks 6(b), 1(b), 0(a): AP = 1/3;
    # x=6 ranks 5(a), 1(b), 0(a): AP = 1/2. mAP = (1/2 + 1/3 + 1/3 + 1/2) / 4 = 5/12, recall@1 = 0.
    x = _on_line(np.array([0.0, 1.0, 5.0, 6.0]))
    labels = ["a", "b", "a", "b"]
    ids = ["i0", "i1", "i2", "i3"]
    kept = retrieval_metrics(x, labels, x, labels, query_ids=ids, gallery_ids=ids, metric="euclidean")
    assert kept["map"] == pytest.approx(5 / 12)
    assert kept["recall_at_1"] == 0.0
    assert kept["map_at_r"] == 0.0
    assert kept["n_queries_without_positive"] == 0
    off = retrieval_metrics(
        x, labels, x, labels, query_ids=ids, gallery_ids=ids, metric="euclidean", exclude_same_id=False
    )
    no_ids = retrieval_metrics(x, labels, x, labels, metric="euclidean")
    assert off["recall_at_1"] == no_ids["recall_at_1"] == 1.0


def test_leave_one_out_can_leave_a_query_without_positive(caplog: pytest.LogCaptureFixture) -> None:
    x = _on_line(np.array([0.0, 1.0, 2.0]))
    with caplog.at_level(logging.WARNING, logger="deepfeat.finetune.metrics"):
        got = retrieval_metrics(
            x,
            ["a", "a", "solo"],
            x,
            ["a", "a", "solo"],
            query_ids=[1, 2, 3],
            gallery_ids=[1, 2, 3],
            metric="euclidean",
        )
    assert got["n_queries_without_positive"] == 1
    assert "1 of 3 queries" in caplog.text and "own id" in caplog.text
    assert got["recall_at_1"] == 1.0


def test_group_exclusion_removes_the_same_patient() -> None:
    # Query q (label "sick", patient p1). Gallery: two other images of p1 (one sick, one healthy) right
    # next to it, then a sick image of patient p2 further away.
    g = _on_line(np.array([0.1, 0.2, 3.0, 5.0]))
    gl = ["sick", "healthy", "healthy", "sick"]
    g_groups = ["p1", "p1", "p2", "p2"]
    q = _on_line(np.array([0.0]))
    with_group = retrieval_metrics(
        q,
        ["sick"],
        g,
        gl,
        query_groups=["p1"],
        gallery_groups=g_groups,
        exclude_same_group=True,
        metric="euclidean",
        ks=(1, 2),
    )
    # Remaining ranking: 3.0 (healthy), 5.0 (sick): R = 1, AP = 1/2, recall@1 = 0, recall@2 = 1.
    assert with_group["map"] == pytest.approx(0.5)
    assert with_group["recall_at_1"] == 0.0 and with_group["recall_at_2"] == 1.0
    # Groups given but not excluded: p1's sick image at rank 1. Ranking: s h h s, R = 2,
    # AP = (1/1 + 2/4)/2 = 0.75.
    without = retrieval_metrics(
        q, ["sick"], g, gl, query_groups=["p1"], gallery_groups=g_groups, metric="euclidean", ks=(1, 2)
    )
    assert without["map"] == pytest.approx(0.75)
    assert without["recall_at_1"] == 1.0


def test_group_exclusion_can_remove_every_positive(caplog: pytest.LogCaptureFixture) -> None:
    g = _on_line(np.array([0.0, 1.0]))
    with caplog.at_level(logging.WARNING, logger="deepfeat.finetune.metrics"):
        got = retrieval_metrics(
            g,
            ["a", "b"],
            g,
            ["a", "b"],
            query_groups=["p", "q"],
            gallery_groups=["p", "q"],
            exclude_same_group=True,
        )
    assert got["n_queries_without_positive"] == 2
    assert math.isnan(got["map"]) and math.isnan(got["recall_at_1"])
    assert "2 of 2 queries" in caplog.text and "group" in caplog.text


# --- records ------------------------------------------------------------------------------------------


def _records() -> tuple[np.ndarray, pd.DataFrame]:
    x = np.array([0.0, 1.0, 5.0, 6.0, 0.5, 100.0])
    df = pd.DataFrame(
        {
            "id": ["i0", "i1", "i2", "i3", "i4", "t0"],
            "label": ["a", "b", "a", "b", "a", "a"],
            "split": ["test", "test", "test", "test", "test", "train"],
            "is_query": [True, True, True, True, False, True],
            "is_gallery": [True, True, True, True, True, True],
            "group": ["p0", "p1", "p2", "p3", "p0", "p9"],
        }
    )
    return _on_line(x), df


def test_from_records_matches_explicit_call() -> None:
    emb, df = _records()
    test = df["split"] == "test"
    q, g = (test & df["is_query"]).to_numpy(), (test & df["is_gallery"]).to_numpy()
    expected = retrieval_metrics(
        emb[q],
        df["label"][q],
        emb[g],
        df["label"][g],
        query_ids=df["id"][q],
        gallery_ids=df["id"][g],
        metric="euclidean",
    )
    got = retrieval_metrics_from_records(emb, df, split="test", metric="euclidean")
    assert got == expected
    assert got["n_queries"] == 4 and got["n_gallery"] == 5
    from_torch = retrieval_metrics_from_records(torch.from_numpy(emb), df, split="test", metric="euclidean")
    assert from_torch == expected


def test_from_records_group_exclusion_and_all_splits() -> None:
    emb, df = _records()
    # i0's nearest same-label item is i4 (x=0.5), of the same group p0: excluding groups changes i0's AP.
    plain = retrieval_metrics_from_records(emb, df, split="test", metric="euclidean")
    grouped = retrieval_metrics_from_records(
        emb, df, split="test", metric="euclidean", exclude_same_group=True
    )
    assert grouped["map"] < plain["map"]
    everything = retrieval_metrics_from_records(emb, df, metric="euclidean")
    assert everything["n_queries"] == 5 and everything["n_gallery"] == 6


def test_from_records_errors() -> None:
    emb, df = _records()
    with pytest.raises(DataError, match=r"lacks the column\(s\) \['is_query'\]"):
        retrieval_metrics_from_records(emb, df.drop(columns="is_query"))
    with pytest.raises(DataError, match=r"emb has 5 rows .* records_df has 6"):
        retrieval_metrics_from_records(emb[:5], df)
    with pytest.raises(DataError, match=r"no records in split 'val'.*\['test', 'train'\]"):
        retrieval_metrics_from_records(emb, df, split="val")
    with pytest.raises(DataError, match="'split'"):
        retrieval_metrics_from_records(emb, df.drop(columns="split"), split="test")


# --- errors -------------------------------------------------------------------------------------------


def test_error_width_mismatch_names_shapes() -> None:
    with pytest.raises(DataError, match=r"query_emb \(2, 3\), gallery_emb \(4, 5\)"):
        retrieval_metrics(np.zeros((2, 3)), ["a", "b"], np.ones((4, 5)), list("abcd"))


def test_error_label_length_mismatch() -> None:
    with pytest.raises(DataError, match=r"gallery_labels .* \(4\); received shape \(3,\)"):
        retrieval_metrics(np.ones((2, 3)), ["a", "b"], np.ones((4, 3)), ["a", "b", "c"])
    with pytest.raises(DataError, match=r"query_ids .* \(2\); received shape \(1,\)"):
        retrieval_metrics(
            np.ones((2, 3)),
            ["a", "b"],
            np.ones((4, 3)),
            list("abcd"),
            query_ids=["x"],
            gallery_ids=list("abcd"),
        )


def test_error_empty_gallery_and_no_queries() -> None:
    with pytest.raises(DataError, match=r"gallery is empty .*\(0, 3\)"):
        retrieval_metrics(np.ones((2, 3)), ["a", "b"], np.ones((0, 3)), [])
    with pytest.raises(DataError, match="no queries"):
        retrieval_metrics(np.ones((0, 3)), [], np.ones((2, 3)), ["a", "b"])


def test_error_nan_and_inf_embeddings() -> None:
    q = np.ones((4, 3), dtype=np.float32)
    q[2, 1] = np.nan
    with pytest.raises(DataError, match=r"query_emb has NaN or inf values in 1 of 4 rows \(first: \[2\]\)"):
        retrieval_metrics(q, list("abcd"), np.ones((2, 3)), ["a", "b"])
    g = torch.ones(2, 3)
    g[0, 0] = math.inf
    with pytest.raises(DataError, match="gallery_emb has NaN or inf"):
        retrieval_metrics(np.ones((1, 3)), ["a"], g, ["a", "b"])


def test_error_not_two_dimensional() -> None:
    with pytest.raises(DataError, match=r"query_emb must be 2-D .*received shape \(3,\).*reshape\(1, -1\)"):
        retrieval_metrics(np.ones(3), ["a"], np.ones((2, 3)), ["a", "b"])
    with pytest.raises(DataError, match="must hold numbers"):
        retrieval_metrics(np.array([["x", "y"]]), ["a"], np.ones((2, 2)), ["a", "b"])


def test_error_arguments() -> None:
    args = (np.ones((2, 3)), ["a", "b"], np.ones((2, 3)), ["a", "b"])
    with pytest.raises(DataError, match="unknown metric 'dot'"):
        retrieval_metrics(*args, metric="dot")  # type: ignore[arg-type]
    for ks in [(), (0, 5), (1.5,)]:
        with pytest.raises(DataError, match="ks must be"):
            retrieval_metrics(*args, ks=ks)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="chunk_size must be a positive int; received 0"):
        retrieval_metrics(*args, chunk_size=0)
    with pytest.raises(DataError, match="received only query_ids"):
        retrieval_metrics(*args, query_ids=["x", "y"])
    with pytest.raises(DataError, match="exclude_same_group=True needs both"):
        retrieval_metrics(*args, exclude_same_group=True, query_groups=["p", "q"])
    with pytest.raises(DataError, match="query_labels has 1 missing"):
        retrieval_metrics(np.ones((2, 3)), ["a", None], np.ones((2, 3)), ["a", "b"])


# --- table --------------------------------------------------------------------------------------------


def test_format_metrics_table_with_delta() -> None:
    rows = {
        "off-the-shelf": {"recall_at_1": 0.5, "map_at_r": 0.25, "n_queries": 10},
        "fine-tuned": {"recall_at_1": 0.75, "map_at_r": 0.2, "n_queries": 10},
    }
    text = format_metrics_table(rows, keys=["recall_at_1", "map_at_r", "map", "n_queries"], delta=True)
    lines = text.splitlines()
    assert lines[0].split() == ["recall_at_1", "map_at_r", "map", "n_queries"]
    assert lines[1].split() == ["off-the-shelf", "0.5000", "0.2500", "-", "10"]
    assert lines[2].split() == ["fine-tuned", "0.7500", "0.2000", "-", "10"]
    assert lines[3].split() == ["delta", "+0.2500", "-0.0500", "-", "+0"]
    # columns are right-aligned: every value ends where its header ends
    header_end = lines[0].index("map_at_r") + len("map_at_r")
    assert all(
        line[:header_end].endswith(value)
        for line, value in zip(lines[1:], ["0.2500", "0.2000", "-0.0500"], strict=True)
    )


def test_format_metrics_table_all_keys_and_errors() -> None:
    result = retrieval_metrics(_on_line(QUERY_X), QUERY_LABELS, _on_line(GALLERY_X), GALLERY_LABELS)
    text = format_metrics_table({"model": result}, keys=None, digits=2)
    header, row = text.splitlines()
    assert header.split() == list(result)
    assert row.split()[0] == "model" and row.split()[1] == "0.50" and row.split()[-1] == "1"
    with pytest.raises(DataError, match="at least one row"):
        format_metrics_table({})
    with pytest.raises(DataError, match="two rows"):
        format_metrics_table({"model": result}, delta=True)


# --- GPU ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="compares the CUDA path with the CPU one; needs a GPU"
)
def test_cuda_matches_cpu() -> None:
    p = _random_problem(seed=7, n_q=300, n_g=2000, dim=32)
    kwargs = {
        "query_ids": p["qid"],
        "gallery_ids": p["gid"],
        "query_groups": p["qgrp"],
        "gallery_groups": p["ggrp"],
        "exclude_same_group": True,
    }
    cpu = retrieval_metrics(p["q"], p["ql"], p["g"], p["gl"], chunk_size=64, **kwargs)
    gpu = retrieval_metrics(
        torch.from_numpy(p["q"]).cuda(), p["ql"], p["g"], p["gl"], chunk_size=64, **kwargs
    )
    _assert_metrics(gpu, cpu)
