"""Search a real Milvus Lite collection: vectors, ids, images; filters, group-by, range; tables; the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from support.connectors import DIM, fingerprint_of, make_images, record_ids, synthetic_vectors, write_shards

from deepfeat.connectors import (
    format_hits_table,
    load_shards,
    search_ids,
    search_images,
    search_vectors,
    sync_records,
)
from deepfeat.connectors.client import MilvusConnector
from deepfeat.finetune.errors import DataError, MismatchError
from deepfeat.finetune.models.bundle import ModelBundle
from deepfeat.recipes.cli import main

N = 60



@pytest.fixture
def loaded(conn: MilvusConnector, bundle_dir: Path, tmp_path: Path) -> tuple[MilvusConnector, list[str], np.ndarray]:
    ids = record_ids(N)
    vectors = synthetic_vectors(N, seed=7)
    write_shards(
        tmp_path / "shards",
        fingerprint_of(bundle_dir),
        vectors,
        ids,
        shard_size=25,
        extra={"price": [float(i) for i in range(N)]},
    )
    load_shards(conn, "items", tmp_path / "shards", index="HNSW:M=8", progress=False)
    return conn, ids, vectors


def test_top_k_by_vector_finds_itself_first_in_batches(loaded: tuple[MilvusConnector, list[str], np.ndarray]) -> None:
    conn, ids, vectors = loaded
    results = search_vectors(conn, "items", vectors[:25], top_k=5, batch_size=4)
    assert len(results) == 25 and all(len(h) == 5 for h in results)
    assert [h[0]["record_id"] for h in results] == ids[:25]
    assert results[0][0]["score"] == pytest.approx(1.0, abs=1e-5) and results[0][0]["rank"] == 1
    scores = [h["score"] for h in results[3]]
    assert scores == sorted(scores, reverse=True)
    expected = np.argsort(-(vectors @ vectors[3]))[:5]
    assert [h["record_id"] for h in results[3]] == [ids[i] for i in expected]


def test_filters_on_metadata(loaded: tuple[MilvusConnector, list[str], np.ndarray]) -> None:
    conn, _, vectors = loaded
    hits = search_vectors(
        conn, "items", vectors[:3], top_k=10, filter='label == "class_1"', output_fields=["record_id", "label", "price"]
    )
    assert all(h["label"] == "class_1" for q in hits for h in q) and all(len(q) == 10 for q in hits)
    hits = search_vectors(conn, "items", vectors[:1], top_k=50, filter='split == "test" and price < 30')
    assert hits[0] and all(h["split"] == "test" for h in hits[0]) and len(hits[0]) == 10


def test_group_by_returns_one_hit_per_group(loaded: tuple[MilvusConnector, list[str], np.ndarray]) -> None:
    conn, _, vectors = loaded
    hits = search_vectors(conn, "items", vectors[:2], top_k=6, group_by="group")
    for q in hits:
        groups = [h["group"] for h in q]
        assert len(groups) == 6 and len(set(groups)) == 6
    two = search_vectors(conn, "items", vectors[:1], top_k=3, group_by="group", group_size=2)[0]
    counts: dict[str, int] = {}
    for h in two:
        counts[h["group"]] = counts.get(h["group"], 0) + 1
    assert len(counts) == 3 and max(counts.values()) == 2
    with pytest.raises(DataError, match="cannot group by 'colour'"):
        search_vectors(conn, "items", vectors[:1], group_by="colour")


def test_range_search_keeps_only_similar_hits(loaded: tuple[MilvusConnector, list[str], np.ndarray]) -> None:
    conn, ids, vectors = loaded
    sims = vectors @ vectors[0]
    hits = search_vectors(conn, "items", vectors[:1], top_k=N, radius=0.3)[0]
    assert {h["record_id"] for h in hits} == {ids[i] for i in np.flatnonzero(sims > 0.3)}
    assert all(h["score"] > 0.3 for h in hits)
    band = search_vectors(conn, "items", vectors[:1], top_k=N, radius=0.3, range_filter=0.99)[0]
    assert ids[0] not in {h["record_id"] for h in band} and len(band) == len(hits) - 1
    with pytest.raises(DataError, match="range_filter needs radius"):
        search_vectors(conn, "items", vectors[:1], range_filter=0.9)
    with pytest.raises(DataError, match="must be above radius"):
        search_vectors(conn, "items", vectors[:1], radius=0.9, range_filter=0.5)


def test_search_by_id_excludes_itself(loaded: tuple[MilvusConnector, list[str], np.ndarray]) -> None:
    conn, ids, _ = loaded
    quoted = ids[5]
    assert "'" in quoted
    hits = search_ids(conn, "items", [quoted, ids[1]], top_k=4)
    assert [len(h) for h in hits] == [4, 4] and quoted not in [h["record_id"] for h in hits[0]]
    with_self = search_ids(conn, "items", [quoted], top_k=4, exclude_self=False)[0]
    assert with_self[0]["record_id"] == quoted
    grouped = search_ids(conn, "items", [quoted], top_k=5, group_by="group")[0]
    assert len({h["group"] for h in grouped}) == 5
    with pytest.raises(DataError, match=r"not in collection 'items' \(1 missing\)"):
        search_ids(conn, "items", ["no/such.png"])


def test_output_fields_and_bad_queries(loaded: tuple[MilvusConnector, list[str], np.ndarray]) -> None:
    conn, _, vectors = loaded
    hit = search_vectors(conn, "items", vectors[0], top_k=1, output_fields=["record_id", "price"])[0][0]
    assert set(hit) == {"rank", "pk", "score", "record_id", "price"}
    every = search_vectors(conn, "items", vectors[0], top_k=1, output_fields=["*"])[0][0]
    assert {"model_version", "content_hash", "is_query", "price"} <= set(every)
    with pytest.raises(DataError, match=r"output field\(s\) \['colour'\]"):
        search_vectors(conn, "items", vectors[:1], output_fields=["colour"])
    bad = vectors[:2].copy()
    bad[1, 0] = np.nan
    with pytest.raises(DataError, match="NaN or infinite"):
        search_vectors(conn, "items", bad)
    with pytest.raises(MismatchError, match="dim 8"):
        search_vectors(conn, "items", np.ones((1, 8), dtype=np.float32))


def test_hits_table(loaded: tuple[MilvusConnector, list[str], np.ndarray]) -> None:
    conn, ids, vectors = loaded
    results = search_vectors(conn, "items", vectors[:2], top_k=2, output_fields=["record_id", "label"])
    text = format_hits_table(results, queries=["first", "second"])
    lines = text.splitlines()
    assert lines[0].split() == ["query", "rank", "score", "record_id", "label"]
    assert len(lines) == 2 + 4 and lines[2].startswith("first") and ids[0].split("/")[0] in lines[2]
    assert "(no hits)" in format_hits_table([[]], queries=["q"])


def test_search_by_image_checks_the_bundle(
    conn: MilvusConnector, bundle: ModelBundle, other_bundle_dir: Path, tmp_path: Path
) -> None:
    root = make_images(tmp_path / "images", n_per_class=2)
    sync_records(conn, "shop", root, bundle, progress=False)
    hits = search_images(conn, "shop", [root / "green" / "01.png", root / "blue" / "00.png"], bundle, top_k=2)
    assert [h[0]["record_id"] for h in hits] == ["green/01.png", "blue/00.png"]
    with pytest.raises(MismatchError, match="searching collection 'shop'"):
        search_images(conn, "shop", [root / "green" / "01.png"], other_bundle_dir)
    with pytest.raises(MismatchError):
        search_vectors(conn, "shop", np.ones(DIM, dtype=np.float32), bundle=other_bundle_dir)


def test_cli_image_search_shows_its_steps_unless_quiet(
    conn: MilvusConnector, bundle: ModelBundle, bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_images(tmp_path / "images", n_per_class=2)
    sync_records(conn, "shop", root, bundle, progress=False)
    conn.close()
    query = str(root / "green" / "01.png")
    argv = ["search", "-c", "shop", "--uri", conn.uri, "--image", query, "--bundle", str(bundle_dir), "-k", "1",
            "--format", "json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)[0]["hits"][0]["record_id"] == "green/01.png"
    assert f"loading model bundle {bundle_dir}" in captured.err and "embedding 1 image(s)" in captured.err
    assert main([*argv, "--quiet"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)[0]["hits"][0]["record_id"] == "green/01.png" and captured.err == ""


def test_cli_load_search_collections(bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "cli.db")
    ids = record_ids(30)
    vectors = synthetic_vectors(30, seed=2)
    write_shards(tmp_path / "shards", fingerprint_of(bundle_dir), vectors, ids)
    assert (
        main(
            [
                "load",
                str(tmp_path / "shards"),
                "-c",
                "items",
                "--uri",
                db,
                "--no-progress",
                "--format",
                "json",
                "--index",
                "IVF_FLAT:nlist=4",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["final_count"] == 30 and report["verified"] is True

    np.save(tmp_path / "q.npy", vectors[:2])
    assert (
        main(
            [
                "search",
                "-c",
                "items",
                "--uri",
                db,
                "--vector-file",
                str(tmp_path / "q.npy"),
                "-k",
                "3",
                "--filter",
                'split == "train"',
                "--format",
                "json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 2 and all(h["split"] == "train" for q in out for h in q["hits"])
    assert main(["search", "-c", "items", "--uri", db, "--id", ids[4], "--group-by", "group", "-k", "3"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["query", "rank", "score"]
    assert table.count(ids[4]) == 3  # as the query label of 3 hits, never as a hit

    assert main(["collections", "list", "--uri", db]) == 0
    listing = capsys.readouterr().out
    assert "items" in listing and "IVF_FLAT" in listing and "30" in listing
    assert main(["collections", "describe", "items", "--uri", db]) == 0
    assert json.loads(capsys.readouterr().out)["index"]["params"] == {"nlist": 4}
    assert main(["collections", "drop", "items", "--uri", db]) == 1  # needs --yes
    assert "add --yes" in capsys.readouterr().err
    assert main(["search", "-c", "nope", "--uri", db, "--vector-file", str(tmp_path / "q.npy")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deepfeat: error: no collection 'nope'") and err.count("\n") == 1
    assert main(["collections", "drop", "items", "--uri", db, "--yes"]) == 0
    from deepfeat.connectors import connect

    c = connect(db)
    assert c.client.list_collections() == []
    c.release_lite()
