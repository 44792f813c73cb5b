"""The shard contract (finetune/inference/shards.py): written, resumed and read in one place; damaged
shards and null or repeated ids refused with one line naming the file or the ids (issue 22), by
``read_shards`` and by ``deepfeat load`` into a real Milvus Lite before anything is sent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.connectors import fingerprint_of, synthetic_vectors

from deepfeat.connectors import load_shards
from deepfeat.connectors.client import MilvusConnector
from deepfeat.finetune.data.dataset import SkipReport
from deepfeat.finetune.errors import DataError
from deepfeat.finetune.inference.shards import (
    BUNDLE_METADATA_KEY,
    REPORT_NAME,
    ShardWriter,
    check_ids,
    list_shards,
    read_shards,
    shard_fingerprint,
)


def _rows(ids: list[Any]) -> pd.DataFrame:
    n = len(ids)
    return pd.DataFrame({"id": ids, "path": [f"/img/{i}.png" for i in range(n)], "label": ["a"] * n,
                         "split": ["train"] * n, "group": [str(i) for i in ids], "content_hash": ["h"] * n})


def _write(out: Path, fingerprint: dict[str, Any], ids: list[Any], shard_size: int = 4) -> ShardWriter:
    writer = ShardWriter(out, fingerprint, shard_size=shard_size)
    vectors = synthetic_vectors(len(ids))
    for start in range(0, len(ids), 2):
        writer.add(_rows(ids[start : start + 2]), vectors[start : start + 2])
    writer.close(SkipReport())
    return writer


def test_writer_round_trip_metadata_and_resume(bundle_dir: Path, tmp_path: Path) -> None:
    fp = fingerprint_of(bundle_dir)
    ids = [f"r{i}" for i in range(10)]
    writer = _write(tmp_path / "s", fp, ids)
    assert [p.name for p in writer.shards] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [REPORT_NAME, *(p.name for p in writer.shards)]
    rows, vectors, got = read_shards(tmp_path / "s")
    assert got == fp == shard_fingerprint(writer.shards[0])
    assert rows["id"].tolist() == ids and vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors, synthetic_vectors(10))
    assert pq.read_schema(writer.shards[0]).field("vector").type == pa.list_(pa.float32(), vectors.shape[1])

    (tmp_path / "s" / "part-00001.parquet").unlink()  # a gap: new shards go after the highest one
    again = ShardWriter(tmp_path / "s", fp, shard_size=4)
    assert again.done_ids == set(ids) - {"r4", "r5", "r6", "r7"}
    again.add(_rows(["r4", "r5"]), synthetic_vectors(2))
    assert again.flush() == tmp_path / "s" / "part-00003.parquet"


def test_writer_refuses_shards_of_another_bundle(bundle_dir: Path, other_bundle_dir: Path, tmp_path: Path) -> None:
    _write(tmp_path / "s", fingerprint_of(bundle_dir), ["a", "b"])
    with pytest.raises(DataError, match=r"holds shards from another model bundle.*use an empty --out"):
        ShardWriter(tmp_path / "s", fingerprint_of(other_bundle_dir))


def _duplicated(tmp_path: Path, bundle_dir: Path) -> Path:
    """Two shards where 4 rows share 2 ids (a shard copied under another name), plus distinct ones."""
    out = tmp_path / "dup"
    _write(out, fingerprint_of(bundle_dir), ["x1", "x2", "u1", "u2"], shard_size=2)
    (out / "part-00005.parquet").write_bytes((out / "part-00000.parquet").read_bytes())
    return out


def _null_ids(tmp_path: Path, bundle_dir: Path) -> Path:
    out = tmp_path / "null"
    _write(out, fingerprint_of(bundle_dir), ["n1", None, "n3", None], shard_size=4)
    return out


def test_repeated_and_null_ids_are_refused_by_read_shards(bundle_dir: Path, tmp_path: Path) -> None:
    dup = _duplicated(tmp_path, bundle_dir)
    with pytest.raises(DataError) as err:
        read_shards(dup)
    message = str(err.value)
    assert "2 record id(s) occur more than once" in message and "\n" not in message
    assert "'x1' x2 (part-00000.parquet, part-00005.parquet)" in message and "'x2' x2" in message
    assert "'u1'" not in message
    with pytest.raises(DataError, match=r"part-00000\.parquet.* 2 row\(s\) with a null 'id' \(rows \[1, 3\]\)"):
        read_shards(_null_ids(tmp_path, bundle_dir))
    # a resumed embed into such a directory is refused as well, before it writes anything
    with pytest.raises(DataError, match="occur more than once"):
        ShardWriter(dup, fingerprint_of(bundle_dir))


@pytest.mark.parametrize("case", ["duplicate", "null"])
def test_load_refuses_repeated_or_null_ids_before_sending_anything(
    case: str, conn: MilvusConnector, bundle_dir: Path, tmp_path: Path
) -> None:
    shards = _duplicated(tmp_path, bundle_dir) if case == "duplicate" else _null_ids(tmp_path, bundle_dir)
    expected = r"'x1' x2 .*'x2' x2" if case == "duplicate" else r"null 'id' \(rows \[1, 3\]\)"
    with pytest.raises(DataError, match=expected):
        load_shards(conn, "items", shards, progress=False)
    assert not conn.has_collection("items")  # nothing created, nothing sent


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated"])
def test_unreadable_parquet_is_refused_naming_the_file(
    damage: str, conn: MilvusConnector, bundle_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "s"
    _write(out, fingerprint_of(bundle_dir), ["a", "b", "c", "d"], shard_size=2)
    bad = out / "part-00001.parquet"
    data = bad.read_bytes()
    bad.write_bytes({"empty": b"", "garbage": b"PAR1 this is not parquet at all", "truncated": data[:-20]}[damage])
    for read in (read_shards, lambda p: load_shards(conn, "items", p, progress=False),
                 lambda p: ShardWriter(p, fingerprint_of(bundle_dir))):
        with pytest.raises(DataError) as err:
            read(out)
        message = str(err.value)
        assert f"{str(bad)!r} is not a readable Parquet file" in message and "\n" not in message
        assert "delete it and re-run 'deepfeat embed' with the same --out" in message
    assert not conn.has_collection("items")


@pytest.mark.parametrize(
    ("raw", "expected"), [(b"{not json", "is not JSON"), (b"[1, 2]", "a JSON list, not an object")]
)
def test_damaged_bundle_metadata_is_refused(raw: bytes, expected: str, bundle_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    writer = _write(out, fingerprint_of(bundle_dir), ["a", "b"])
    table = pq.read_table(writer.shards[0])
    pq.write_table(table.replace_schema_metadata({BUNDLE_METADATA_KEY: raw}), writer.shards[0])
    with pytest.raises(DataError, match=f"damaged bundle record.*{expected}"):
        read_shards(out)
    with pytest.raises(DataError, match="records no model bundle"):
        pq.write_table(table.replace_schema_metadata({}), writer.shards[0])
        shard_fingerprint(writer.shards[0])


def test_check_ids_returns_every_id_and_list_shards_refuses_nothing_to_read(bundle_dir: Path, tmp_path: Path) -> None:
    writer = _write(tmp_path / "s", fingerprint_of(bundle_dir), ["a", "b", "c"], shard_size=2)
    assert check_ids(writer.shards) == {"a", "b", "c"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no shards"):
        list_shards(tmp_path / "empty")
    assert json.loads((tmp_path / "s" / REPORT_NAME).read_text()) == {"n_skipped": 0, "skipped": []}
