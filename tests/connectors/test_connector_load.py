"""Loading shards into a real Milvus Lite: create, re-run without duplicates, kill and resume, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from support.connectors import DIM, all_rows, fingerprint_of, record_ids, synthetic_vectors, write_shards

from deepfeat.connectors import (
    CollectionSpec,
    IndexSpec,
    connect,
    create_collection,
    load_embeddings,
    load_shards,
    open_collection,
    primary_key,
    search_vectors,
)
from deepfeat.connectors.client import MilvusConnector
from deepfeat.finetune.errors import ConnectorError, DataError, MismatchError


def test_load_creates_collection_and_rerun_adds_no_duplicates(
    conn: MilvusConnector, bundle_dir: Path, tmp_path: Path
) -> None:
    ids = record_ids(120)
    vectors = synthetic_vectors(120)
    write_shards(
        tmp_path / "shards",
        fingerprint_of(bundle_dir),
        vectors,
        ids,
        shard_size=50,
        extra={"price": [float(i) for i in range(120)], "stock": list(range(120))},
    )
    report = load_shards(
        conn, "items", tmp_path / "shards", index="HNSW:M=8,efConstruction=64", batch_rows=32, progress=False
    )
    assert (report.rows_written, report.final_count, report.expected_count, report.verified) == (120, 120, 120, True)
    spec = open_collection(conn, "items", bundle=bundle_dir)
    assert spec.dim == DIM and spec.metric == "COSINE" and spec.key == "record_id"
    assert {"price", "stock", "label", "group", "split", "path", "model_version"} <= set(spec.field_names)
    index = conn.client.describe_index("items", "vector")
    assert index["index_type"] == "HNSW" and index["params"] == {"M": 8, "efConstruction": 64}

    again = load_shards(conn, "items", tmp_path / "shards", batch_rows=32, progress=False)
    assert again.rows_written == 0 and again.rows_resumed == 120 and again.final_count == 120
    restart = load_shards(conn, "items", tmp_path / "shards", batch_rows=7, resume=False, progress=False)
    assert restart.rows_written == 120 and restart.final_count == 120

    rows = all_rows(conn, "items")
    assert sorted(rows) == sorted(ids)  # quotes and spaces in ids survive, keys are hex digests
    for i in (0, 5, 7, 35):
        assert rows[ids[i]]["pk"] == primary_key(ids[i])
        np.testing.assert_array_equal(np.asarray(rows[ids[i]]["vector"], dtype=np.float32), vectors[i])
    got = conn.client.get("items", ids=[primary_key(ids[5])], output_fields=["price", "stock", "model_version"])
    assert got[0]["price"] == 5.0 and got[0]["stock"] == 5
    assert got[0]["model_version"] == fingerprint_of(bundle_dir)["bundle_id"]


def test_reopened_database_is_searchable_and_keeps_the_bundle(bundle_dir: Path, tmp_path: Path) -> None:
    db = str(tmp_path / "reopen.db")
    write_shards(tmp_path / "shards", fingerprint_of(bundle_dir), synthetic_vectors(30), record_ids(30))
    first = connect(db)
    load_shards(first, "items", tmp_path / "shards", progress=False)
    first.release_lite()  # stops this process's Lite server: the next open reads the .db from disk
    again = connect(db)
    assert "Loaded" not in str(again.client.get_load_state("items")["state"]).replace("NotLoad", "")
    spec = open_collection(again, "items", bundle=bundle_dir)
    hits = search_vectors(again, "items", np.ones((1, DIM), dtype=np.float32), top_k=3)  # loads it first
    assert spec.fingerprint == fingerprint_of(bundle_dir) and len(hits[0]) == 3
    again.release_lite()


@pytest.mark.parametrize("kind, params", [("IVF_FLAT", {"nlist": 8}), ("FLAT", {}), ("AUTOINDEX", {})])
def test_index_params_reach_the_server(
    conn: MilvusConnector, bundle_dir: Path, kind: str, params: dict[str, int]
) -> None:
    spec = CollectionSpec.from_bundle("idx", bundle_dir, index=IndexSpec(kind, params))  # type: ignore[arg-type]
    create_collection(conn, spec)
    desc = conn.client.describe_index("idx", "vector")
    assert desc["index_type"] == kind or kind == "AUTOINDEX"
    assert {k: desc.get("params", {}).get(k) for k in params} == params


def test_unknown_index_parameter_is_refused() -> None:
    with pytest.raises(ConnectorError, match="nlists"):
        IndexSpec.parse("IVF_FLAT:nlists=64")
    with pytest.raises(ConnectorError, match="unknown index type"):
        IndexSpec.parse("DISKANN")


def test_nan_and_inf_vectors_are_refused_before_writing(
    conn: MilvusConnector, bundle_dir: Path, tmp_path: Path
) -> None:
    vectors = synthetic_vectors(40)
    vectors[13, 2] = np.nan
    vectors[29, 0] = np.inf
    ids = record_ids(40)
    write_shards(tmp_path / "shards", fingerprint_of(bundle_dir), vectors, ids, shard_size=40)
    with pytest.raises(DataError, match=r"2 vector\(s\) contain NaN or infinite") as err:
        load_shards(conn, "items", tmp_path / "shards", progress=False)
    assert ids[13] in str(err.value)
    assert conn.count("items") == 0  # nothing of the batch was written


def test_shards_of_another_bundle_are_refused(
    conn: MilvusConnector, bundle_dir: Path, other_bundle_dir: Path, tmp_path: Path
) -> None:
    write_shards(tmp_path / "a", fingerprint_of(bundle_dir), synthetic_vectors(20), record_ids(20))
    write_shards(tmp_path / "b", fingerprint_of(other_bundle_dir), synthetic_vectors(20, seed=1), record_ids(20))
    load_shards(conn, "items", tmp_path / "a", progress=False)
    with pytest.raises(MismatchError, match="bundle_id"):
        load_shards(conn, "items", tmp_path / "b", progress=False)
    with pytest.raises(MismatchError, match="bundle_id"):
        load_shards(conn, "items2", tmp_path / "a", bundle=other_bundle_dir, progress=False)
    assert conn.count("items") == 20


def test_vectors_of_another_dim_are_refused(conn: MilvusConnector, bundle_dir: Path, tmp_path: Path) -> None:
    fp = fingerprint_of(bundle_dir)
    write_shards(tmp_path / "a", fp, synthetic_vectors(10), record_ids(10))
    load_shards(conn, "items", tmp_path / "a", progress=False)
    wrong = {**fp, "embedding_dim": 8}
    write_shards(tmp_path / "b", wrong, synthetic_vectors(10, dim=8), record_ids(10))
    with pytest.raises(MismatchError, match="embedding_dim: 16 != 8"):
        load_shards(conn, "items", tmp_path / "b", progress=False)
    lying = tmp_path / "c"  # metadata says dim 16 but the vectors have 8
    write_shards(lying, fp, synthetic_vectors(10, dim=8), record_ids(10))
    with pytest.raises(MismatchError, match="dim 8 but the collection holds dim 16"):
        load_shards(conn, "items", lying, progress=False)


def test_load_embeddings_from_an_iterator(conn: MilvusConnector, bundle: object, tmp_path: Path) -> None:
    import pandas as pd

    ids = record_ids(45)
    vectors = synthetic_vectors(45)
    frame = pd.DataFrame(
        {
            "id": ids,
            "label": ["a"] * 45,
            "split": ["train"] * 45,
            "group": ids,
            "path": ids,
            "content_hash": [f"{i:064x}" for i in range(45)],
        }
    )
    batches = [(frame.iloc[s : s + 10], vectors[s : s + 10]) for s in range(0, 45, 10)]
    state = tmp_path / "state.json"
    report = load_embeddings(conn, "it", iter(batches), bundle=bundle, state_path=state, progress=False)  # type: ignore[arg-type]
    assert report.final_count == 45 and report.verified
    assert json.loads(state.read_text())["batches_done"] == 5
    again = load_embeddings(conn, "it", iter(batches), bundle=bundle, state_path=state, progress=False)  # type: ignore[arg-type]
    assert again.rows_written == 0 and again.final_count == 45


def test_content_hash_key_collapses_identical_images(conn: MilvusConnector, bundle_dir: Path, tmp_path: Path) -> None:
    files = write_shards(
        tmp_path / "shards", fingerprint_of(bundle_dir), synthetic_vectors(12), record_ids(12), shard_size=12
    )
    table = pq.read_table(files[0])
    hashes = table.column("content_hash").to_pylist()
    hashes[1] = hashes[0]  # the same image under two ids
    pq.write_table(
        table.set_column(
            table.schema.get_field_index("content_hash"), "content_hash", __import__("pyarrow").array(hashes)
        ),
        files[0],
    )
    report = load_shards(conn, "byhash", tmp_path / "shards", key="content_hash", progress=False)
    assert report.final_count == 11 == report.expected_count


def test_lock_held_by_another_process_is_a_clear_error(bundle_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "locked.db"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time
        from pymilvus import MilvusClient
        MilvusClient({str(db)!r})
        print("open", flush=True)
        time.sleep(60)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        with pytest.raises(
            ConnectorError, match=rf"locked by (process {holder.pid}|another process) \(lock file .*LOCK"
        ):
            connect(str(db)).client  # noqa: B018
    finally:
        holder.kill()
        holder.wait()
    c = connect(str(db))  # released by the holder's death
    assert c.client.list_collections() == []
    c.release_lite()


def test_lite_path_must_end_in_db(tmp_path: Path) -> None:
    with pytest.raises(ConnectorError, match=r"must end in '\.db'"):
        connect(str(tmp_path / "milvus")).client  # noqa: B018


_LOADER = textwrap.dedent("""
    import sys
    from deepfeat.connectors import connect, load_shards
    db, shards, state = sys.argv[1:4]
    load_shards(connect(db), "items", shards, batch_rows=int(sys.argv[4]), state_path=state, progress=False)
    print("finished", flush=True)
""")


def test_killed_load_resumes_to_the_exact_count(bundle_dir: Path, tmp_path: Path) -> None:
    n, batch = 1200, 8
    ids = record_ids(n)
    vectors = synthetic_vectors(n, seed=3)
    write_shards(tmp_path / "shards", fingerprint_of(bundle_dir), vectors, ids, shard_size=100)
    db, state = tmp_path / "killed.db", tmp_path / "state.json"
    proc = subprocess.Popen(
        [sys.executable, "-c", _LOADER, str(db), str(tmp_path / "shards"), str(state), str(batch)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    done_at_kill = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                done_at_kill = json.loads(state.read_text()).get("rows_done", 0)
            except (OSError, json.JSONDecodeError):
                done_at_kill = 0
            if done_at_kill >= 200:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the loader was not killed mid-way (rc {proc.returncode}): {err}"
    assert 200 <= done_at_kill < n

    resumed = connect(str(db))
    report = load_shards(resumed, "items", tmp_path / "shards", batch_rows=batch, state_path=state, progress=False)
    assert report.final_count == n and report.expected_count == n and report.verified
    assert report.rows_resumed >= done_at_kill and report.rows_written == n - report.rows_resumed
    rows = all_rows(resumed, "items")
    resumed.release_lite()

    clean = connect(str(tmp_path / "clean.db"))
    load_shards(clean, "items", tmp_path / "shards", state_path=tmp_path / "clean.json", progress=False)
    reference = all_rows(clean, "items")
    clean.release_lite()
    assert sorted(rows) == sorted(reference) == sorted(ids)
    got = np.stack([np.asarray(rows[i]["vector"], dtype=np.float32) for i in ids])
    ref = np.stack([np.asarray(reference[i]["vector"], dtype=np.float32) for i in ids])
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(got, vectors)


def test_outage_mid_load_says_what_is_in_then_resumes(
    conn: MilvusConnector, bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pymilvus.exceptions import MilvusUnavailableException

    write_shards(tmp_path / "shards", fingerprint_of(bundle_dir), synthetic_vectors(100), record_ids(100))
    conn.retries, conn.backoff = 3, 0.001
    real_upsert = conn.client.upsert
    calls = {"n": 0}

    def flaky(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2 or calls["n"] >= 7:  # one blip (retried), then an outage from the 7th call on
            raise MilvusUnavailableException(message="UNAVAILABLE: connection refused")
        return real_upsert(*args, **kwargs)

    monkeypatch.setattr(conn.client, "upsert", flaky)
    with pytest.raises(
        ConnectorError,
        match=r"unreachable after 3 attempts .* 50 of 100 rows are durably in "
        r"collection 'items' \(state file .*\); re-run the same command",
    ):
        load_shards(conn, "items", tmp_path / "shards", batch_rows=10, progress=False)
    monkeypatch.setattr(conn.client, "upsert", real_upsert)
    report = load_shards(conn, "items", tmp_path / "shards", batch_rows=10, progress=False)
    assert (report.rows_resumed, report.rows_written, report.final_count) == (50, 50, 100)
