"""The one query layer (deepfeat.connectors.query) against a real Milvus Lite: typed filter literals, keys with
quotes, fetches, per-query search, iteration; collections deepfeat did not create searched by vector."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from support.connectors import DIM, fingerprint_of, make_images, synthetic_vectors, write_shards

from deepfeat.connectors import (
    Condition,
    DeepfeatImageEmbeddingFunction,
    build_filter,
    collection_frame,
    connect,
    fetch_rows,
    fetch_vectors,
    load_shards,
    open_collection,
    query_rows,
    search_each,
    search_ids,
    search_images,
    search_vectors,
)
from deepfeat.connectors.client import MilvusConnector
from deepfeat.connectors.collection import wait_for_index
from deepfeat.connectors.query import milvus_literal
from deepfeat.finetune.errors import ConnectorError, DataError, MismatchError
from deepfeat.finetune.models.bundle import ModelBundle
from deepfeat.recipes.cli import main

#: Record ids and labels that break hand-built expressions or Milvus Lite's get(ids=...).
HARD = ['a"b', "c'd", "e\\f", "x\ny", "tab\there", '"', "''", "{v}", "Müller/日本.png", 'q" or label != "']


def test_literals_are_typed_and_quoted() -> None:
    assert milvus_literal('PAT"7\\x') == '"PAT\\"7\\\\x"' and milvus_literal("Müller") == '"Müller"'
    assert milvus_literal(3) == "3" and milvus_literal(2.5) == "2.5" and milvus_literal(np.bool_(True)) == "true"
    assert milvus_literal(7, "VARCHAR") == '"7"' and milvus_literal(True, "VARCHAR") == '"true"'
    assert milvus_literal("4", "INT64") == "4" and milvus_literal(4.0, "INT64") == "4"
    assert milvus_literal(" TRUE ", "BOOL") == "true" and milvus_literal(3, "DOUBLE") == "3.0"
    with pytest.raises(DataError, match=r"whole numbers \(INT64\); got 2.5"):
        milvus_literal(2.5, "INT64", field="n")
    with pytest.raises(DataError, match="is a number"):
        milvus_literal(True, "DOUBLE", field="price")
    with pytest.raises(DataError, match="true/false"):
        milvus_literal("yes", "BOOL", field="is_query")
    with pytest.raises(DataError, match="non-finite"):
        milvus_literal(float("nan"))
    with pytest.raises(DataError, match="control character"):
        milvus_literal("a\x01b")
    expr = build_filter(
        "split != 'x'", equals={"label": 'a"b'}, not_equals={"group": "p1"}, ranges={"price": (10, None)},
        isin={"record_id": ["a", 'b"']},
    )
    assert expr == (
        '(split != \'x\') and label == "a\\"b" and group != "p1" and price >= 10.0 and record_id in ["a", "b\\""]'
    )
    assert build_filter(None, "") is None


def test_filters_checked_against_the_collection(conn: MilvusConnector, bundle_dir: Path, tmp_path: Path) -> None:
    ids = [f"r{i}" for i in range(6)]
    write_shards(tmp_path / "s", fingerprint_of(bundle_dir), synthetic_vectors(6), ids,
                 extra={"price": [1.5 * i for i in range(6)], "stock": list(range(6))})
    load_shards(conn, "items", tmp_path / "s", progress=False)
    spec = open_collection(conn, "items")
    expr = build_filter(conditions=[Condition("stock", ">=", "2"), Condition("price", "<", 6)], spec=spec)
    assert expr == "stock >= 2 and price < 6.0"
    assert sorted(r["record_id"] for r in query_rows(conn, spec, ["record_id"], filter=expr)) == ["r2", "r3"]
    with pytest.raises(DataError, match="cannot filter on 'nope'"):
        build_filter(equals={"nope": 1}, spec=spec)
    with pytest.raises(DataError, match="operator < needs a numeric field; 'label' is VARCHAR"):
        build_filter(conditions=[Condition("label", "<", "b")], spec=spec)
    with pytest.raises(DataError, match="whole numbers"):
        build_filter(equals={"stock": 1.5}, spec=spec)


def test_hard_ids_and_labels_round_trip(conn: MilvusConnector, bundle_dir: Path, tmp_path: Path) -> None:
    """Keys with quotes are the Milvus Lite trap: fetch, per-query search and filters by value all hold."""
    n = len(HARD)
    vectors = synthetic_vectors(n, seed=3)
    write_shards(tmp_path / "s", fingerprint_of(bundle_dir), vectors, HARD, extra={"note": HARD})
    load_shards(conn, "hard", tmp_path / "s", progress=False)
    rows = fetch_rows(conn, "hard", HARD, ["note"])
    assert sorted(rows) == sorted(HARD) and all(rows[i]["note"] == i for i in HARD)
    np.testing.assert_allclose(fetch_vectors(conn, "hard", HARD[::-1]), vectors[::-1], atol=1e-6)
    spec = open_collection(conn, "hard")
    for value in HARD:  # a value is a value, never expression text (the last one tries to widen the filter)
        got = query_rows(conn, spec, ["record_id"], filter=build_filter(equals={"note": value}, spec=spec))
        assert [r["record_id"] for r in got] == [value]
    hits = search_ids(conn, "hard", HARD, top_k=n)
    assert all(len(h) == n - 1 and q not in {x["record_id"] for x in h} for q, h in zip(HARD, hits, strict=True))
    same = search_each(conn, "hard", HARD[:2], top_k=3, same=("note",), group_by=None)
    assert same == [[], []]  # every note is unique: nothing else shares it
    with pytest.raises(DataError, match=r"not in collection 'hard' \(1 missing\)"):
        fetch_rows(conn, "hard", ["nope'"])
    meta, vecs = collection_frame(conn, "hard", ("record_id", "note"), filter=build_filter(equals={"note": "''"}))
    assert meta["record_id"].tolist() == ["''"] and vecs.shape == (1, DIM)


def test_milvus_lite_refuses_filter_templates(conn: MilvusConnector, bundle_dir: Path, tmp_path: Path) -> None:
    """What the module docstring records: Milvus Lite parses no ``{placeholder}`` (so literals are sent)."""
    write_shards(tmp_path / "s", fingerprint_of(bundle_dir), synthetic_vectors(3), ["a", "b", "c"])
    load_shards(conn, "items", tmp_path / "s", progress=False)
    if not conn.server_version().startswith("milvus_lite-3."):
        pytest.skip(f"measured on Milvus Lite 3.x; this is {conn.server_version()}")
    with pytest.raises(Exception, match=r"unexpected character '\{'"):
        conn.client.query("items", filter="label == {v}", filter_params={"v": "a"}, output_fields=["pk"])


def test_a_collection_deepfeat_did_not_create_is_searched_by_vector(tmp_path: Path, bundle_dir: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "plain.db")
    vectors = synthetic_vectors(12, seed=5)
    conn = connect(db)
    try:
        conn.client.create_collection("quick", dimension=DIM, metric_type="COSINE")  # MilvusClient's quick setup
        conn.client.insert("quick", [{"id": i, "vector": v.tolist(), "label": f"l{i % 3}"}
                                     for i, v in enumerate(vectors)])
        hits = search_vectors(conn, "quick", vectors[:3], top_k=4, output_fields=["label"])  # a dynamic field
        assert [h[0]["pk"] for h in hits] == [0, 1, 2] and hits[0][0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert [h[0]["label"] for h in hits] == ["l0", "l1", "l2"]
        more = search_ids(conn, "quick", ["4"], top_k=3)[0]
        assert len(more) == 3 and 4 not in [h["pk"] for h in more]
        with pytest.raises(DataError, match=r"field 'id' is a number \(INT64\); got 'four'"):
            search_ids(conn, "quick", ["four"])
        with pytest.raises(MismatchError, match="records no model bundle"):  # images: unsafe, so refused
            search_vectors(conn, "quick", vectors[:1], bundle=bundle_dir)
        with pytest.raises(MismatchError, match="records no model bundle"):
            search_images(conn, "quick", [np.zeros((32, 32, 3), np.uint8)], bundle_dir)
        conn.client.create_collection("wide", dimension=2 * DIM, metric_type="COSINE")
        with pytest.raises(MismatchError, match=r"holds 32-d COSINE vectors, the bundle 'tiny@\w+' makes 16-d"):
            search_images(conn, "wide", [np.zeros((32, 32, 3), np.uint8)], bundle_dir)
        with pytest.raises(ConnectorError, match="not created by deepfeat"):  # writers never touch it
            open_collection(conn, "quick")
        # a custom schema: a VARCHAR key with quotes, a vector field of another name, no index yet
        schema = conn.client.create_schema(auto_id=False)
        from pymilvus import DataType

        schema.add_field("name", DataType.VARCHAR, max_length=64, is_primary=True)
        schema.add_field("emb", DataType.FLOAT_VECTOR, dim=DIM)
        schema.add_field("n", DataType.INT32)
        conn.client.create_collection("custom", schema=schema, consistency_level="Strong")
        conn.client.insert("custom", [{"name": k, "emb": v.tolist(), "n": i}
                                      for i, (k, v) in enumerate(zip(HARD, vectors, strict=False))])
        with pytest.raises(ConnectorError, match="no index on its vector field 'emb'"):
            search_vectors(conn, "custom", vectors[:1])
        index = conn.client.prepare_index_params()
        index.add_index("emb", index_type="FLAT", metric_type="COSINE")
        conn.client.create_index("custom", index, sync=False)  # pymilvus' own wait needs what Lite lacks
        wait_for_index(conn, "custom")
        assert search_vectors(conn, "custom", vectors[1], top_k=1, output_fields=["n"])[0][0] == {
            "rank": 1, "pk": HARD[1], "score": pytest.approx(1.0, abs=1e-5), "n": 1}
        near = search_ids(conn, "custom", [HARD[0]], top_k=2, filter=build_filter(ranges={"n": (2, None)}))[0]
        assert len(near) == 2 and all(h["pk"] not in HARD[:2] for h in near)
    finally:
        conn.release_lite()
    np.save(tmp_path / "q.npy", vectors[:2])
    assert main(["search", "-c", "quick", "--uri", db, "--vector-file", str(tmp_path / "q.npy"), "-k", "2",
                 "--output-fields", "*", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [q["hits"][0]["pk"] for q in out] == [0, 1]


def test_a_collection_filled_by_the_embedding_function(tmp_path: Path, bundle: ModelBundle,
                                                       other_bundle_dir: Path) -> None:
    """Filled through MilvusClient by deepfeat's pymilvus-model style function: searchable by vector at once,
    by image once the bundle is recorded on it, and a query of another bundle is then refused."""
    root = make_images(tmp_path / "images", n_per_class=2)
    files = sorted(str(p) for p in root.rglob("*.png"))
    ef = DeepfeatImageEmbeddingFunction(bundle)
    conn = connect(str(tmp_path / "ef.db"))
    try:
        conn.client.create_collection("shoes", dimension=ef.dim, metric_type=ef.metric)
        docs = ef.encode_documents(files)
        conn.client.insert("shoes", [{"id": i, "vector": v.tolist(), "path": f} for i, (f, v) in
                                     enumerate(zip(files, docs, strict=True))])
        by_vector = search_vectors(conn, "shoes", np.stack(ef.encode_queries(files[:2])), top_k=1)
        assert [h[0]["pk"] for h in by_vector] == [0, 1]
        with pytest.raises(MismatchError, match="record_bundle"):
            search_images(conn, "shoes", files[:1], bundle)
        ef.record_bundle(conn, "shoes")
        assert search_images(conn, "shoes", files[3:4], bundle, top_k=1)[0][0]["pk"] == 3
        with pytest.raises(MismatchError, match="bundle_id"):
            search_images(conn, "shoes", files[:1], other_bundle_dir)
        assert not open_collection(conn, "shoes", foreign_ok=True).managed
        with pytest.raises(ConnectorError, match="not created by deepfeat"):  # still never written by deepfeat
            open_collection(conn, "shoes")
    finally:
        conn.release_lite()
