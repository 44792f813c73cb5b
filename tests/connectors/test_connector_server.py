"""The server path against a real Milvus server (marked ``server``; run with ``pytest -m server``).

The session starts an embedded standalone Milvus from the PyPI package ``milvus`` (``pip install milvus``;
it ships the server binary) when it is importable by this interpreter or by the one named in
``$DEEPFEAT_MILVUS_SERVER_PYTHON``; or it uses the running server in ``$DEEPFEAT_TEST_MILVUS_URI``
(bulk import then needs ``$DEEPFEAT_TEST_MILVUS_STAGING``, a folder that server reads).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from support.connectors import (
    all_rows,
    fingerprint_of,
    make_images,
    record_ids,
    synthetic_vectors,
    write_image,
    write_shards,
)

from deepfeat.connectors import (
    BulkStaging,
    bulk_import_shards,
    connect,
    load_shards,
    open_collection,
    reindex,
    search_ids,
    search_vectors,
    sync_records,
)
from deepfeat.connectors.client import MilvusConnector
from deepfeat.finetune.errors import ConnectorError, MismatchError
from deepfeat.finetune.models.bundle import ModelBundle

pytestmark = pytest.mark.server

_SERVER = textwrap.dedent("""
    import sys
    from milvus import MilvusServer
    server = MilvusServer()
    server.set_base_dir(sys.argv[1])
    server.start()
    print(server.listen_port, flush=True)
    sys.stdin.read()  # until the test session closes our stdin
    server.stop()
""")



@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path | None]]:
    """(URI, staging folder the server reads or None) of a real Milvus server."""
    uri = os.environ.get("DEEPFEAT_TEST_MILVUS_URI")
    if uri:
        staging = os.environ.get("DEEPFEAT_TEST_MILVUS_STAGING")
        yield uri, Path(staging) if staging else None
        return
    python = os.environ.get("DEEPFEAT_MILVUS_SERVER_PYTHON")
    if python is None:
        if importlib.util.find_spec("milvus") is None:
            pytest.skip(
                "no Milvus server: set DEEPFEAT_TEST_MILVUS_URI, or pip install milvus (the embedded "
                "standalone server) here or in the interpreter named by DEEPFEAT_MILVUS_SERVER_PYTHON"
            )
        python = sys.executable
    base = tmp_path_factory.mktemp("milvus-server")
    log = base / "wrapper.log"  # the wrapper's stderr in a file: a pipe nobody reads could fill and block it
    with log.open("w") as err:
        proc = subprocess.Popen(
            [python, "-c", _SERVER, str(base)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True
        )
    assert proc.stdout is not None and proc.stdin is not None
    line = proc.stdout.readline().strip()  # the port, once the server answers its health check
    if not line.isdigit():
        proc.kill()
        proc.wait(timeout=30)
        logs = "\n".join(f.read_text(errors="replace")[-1500:] for f in [log, *sorted(base.glob("logs/*.log"))])
        pytest.fail(f"the embedded Milvus server ({python}) did not start:\n{logs}")
    try:
        yield f"http://127.0.0.1:{line}", base / "data"
    finally:
        proc.stdin.close()  # the wrapper stops the server at EOF
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture
def sconn(server: tuple[str, Path | None]) -> Iterator[MilvusConnector]:
    """A connector on the server; collections created by the test are dropped afterwards."""
    c = connect(server[0])
    before = set(c.client.list_collections())
    yield c
    for alias in c.list_aliases():
        c.client.drop_alias(alias)
    for name in set(c.client.list_collections()) - before:
        c.client.drop_collection(name)
    c.close()


def _name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def test_server_load_rerun_search(sconn: MilvusConnector, bundle_dir: Path, tmp_path: Path) -> None:
    ids = record_ids(150)
    vectors = synthetic_vectors(150, seed=5)
    write_shards(tmp_path / "shards", fingerprint_of(bundle_dir), vectors, ids, shard_size=60)
    name = _name("items")
    report = load_shards(
        sconn, name, tmp_path / "shards", index="HNSW:M=8,efConstruction=64", batch_rows=40, progress=False
    )
    assert report.final_count == 150 and report.verified
    again = load_shards(sconn, name, tmp_path / "shards", resume=False, progress=False)
    assert again.rows_written == 150 and again.final_count == 150  # upserts: no duplicates on a real server
    spec = open_collection(sconn, name, bundle=bundle_dir)
    assert spec.fingerprint == fingerprint_of(bundle_dir)
    index = sconn.client.describe_index(name, "vector")
    assert index["index_type"] == "HNSW" and {k: int(v) for k, v in index["params"].items()} == {
        "M": 8,
        "efConstruction": 64,
    }

    hits = search_vectors(sconn, name, vectors[:3], top_k=4, filter='label != "class_3"')
    assert all(h["label"] != "class_3" for q in hits for h in q) and hits[1][0]["record_id"] == ids[1]
    grouped = search_vectors(sconn, name, vectors[:1], top_k=5, group_by="group")[0]
    assert len(grouped) == 5 and len({h["group"] for h in grouped}) == 5
    ranged = search_vectors(sconn, name, vectors[:1], top_k=150, radius=0.4)[0]
    assert ranged and all(h["score"] > 0.4 for h in ranged)
    by_id = search_ids(sconn, name, [ids[5]], top_k=3)[0]
    assert ids[5] not in [h["record_id"] for h in by_id] and len(by_id) == 3


def test_server_reindex_switches_alias(
    sconn: MilvusConnector, bundle: ModelBundle, other_bundle_dir: Path, tmp_path: Path
) -> None:
    root = make_images(tmp_path / "images", n_per_class=2)
    alias = _name("shop")
    v1 = reindex(sconn, alias, root, bundle, progress=False)
    v2 = reindex(sconn, alias, root, other_bundle_dir, progress=False)
    assert v2.previous_collection == v1.collection and sconn.resolve_alias(alias) == v2.collection
    assert v2.final_count == 6
    with pytest.raises(MismatchError):
        search_vectors(sconn, alias, np.ones(bundle.dim, dtype=np.float32), bundle=bundle)


def test_server_sync_upserts_changes_without_duplicates(
    sconn: MilvusConnector, bundle: ModelBundle, tmp_path: Path
) -> None:
    # a real server keeps a second row for a re-inserted key (Milvus Lite overwrites): sync must upsert and delete
    root = make_images(tmp_path / "images", n_per_class=3)
    name = _name("synced")
    first = sync_records(sconn, name, root, bundle, progress=False)
    assert (first.added, first.updated, first.deleted, first.final_count) == (9, 0, 0, 9)
    before = all_rows(sconn, name)
    rng = np.random.default_rng(7)
    write_image(root / "red" / "01.png", (250, 250, 0), rng)  # changed content
    (root / "green" / "02.png").unlink()  # gone
    write_image(root / "blue" / "03.png", (10, 10, 10), rng)  # new
    second = sync_records(sconn, name, root, bundle, progress=False)
    assert (second.added, second.updated, second.deleted, second.unchanged) == (1, 1, 1, 7)
    after = all_rows(sconn, name)  # fails on a duplicated record id
    assert second.final_count == 9 == len(after) == sconn.count(name)
    assert "green/02.png" not in after and "blue/03.png" in after
    assert after["red/01.png"]["content_hash"] != before["red/01.png"]["content_hash"]
    np.testing.assert_allclose(after["red/01.png"]["vector"], bundle.embed([root / "red" / "01.png"])[0], atol=1e-5)
    hits = search_vectors(sconn, name, np.asarray(after["blue/03.png"]["vector"]), top_k=3, filter='label == "blue"')
    assert hits[0][0]["record_id"] == "blue/03.png" and all(h["label"] == "blue" for h in hits[0])
    third = sync_records(sconn, name, root, bundle, progress=False)
    assert (third.added, third.updated, third.deleted, third.unchanged) == (0, 0, 0, 9)


def test_server_bulk_import_polls_jobs_to_completion(
    sconn: MilvusConnector, server: tuple[str, Path | None], bundle_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip(
        "pymilvus.bulk_writer", reason="needs pip install 'pymilvus[bulk_writer]'", exc_type=ImportError
    )
    if server[1] is None:
        pytest.skip("set DEEPFEAT_TEST_MILVUS_STAGING to a folder the server reads")
    ids = record_ids(300)
    vectors = synthetic_vectors(300, seed=9)
    write_shards(tmp_path / "shards", fingerprint_of(bundle_dir), vectors, ids, shard_size=100)
    name = _name("imported")
    staging = BulkStaging(local_dir=str(server[1] / "deepfeat-import"))
    report = bulk_import_shards(
        sconn,
        name,
        tmp_path / "shards",
        staging=staging,
        index="IVF_FLAT:nlist=16",
        poll_interval=0.5,
        timeout=300,
        progress=False,
    )
    assert report.final_count == 300 and report.verified and report.rows_written == 300
    hits = search_vectors(sconn, name, vectors[:2], top_k=1)
    assert [h[0]["record_id"] for h in hits] == ids[:2]
    again = bulk_import_shards(sconn, name, tmp_path / "shards", staging=staging, progress=False)
    assert again.rows_written == 0 and again.final_count == 300  # the state says every job completed
    other = _name("nonempty")
    load_shards(sconn, other, tmp_path / "shards", progress=False)
    with pytest.raises(ConnectorError, match="already holds 300 rows; an import appends"):
        bulk_import_shards(
            sconn, other, tmp_path / "shards", staging=staging, state_path=tmp_path / "other.json", progress=False
        )
