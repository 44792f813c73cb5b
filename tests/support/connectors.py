"""Shared helpers and fixtures of the connector tests (imported by the test_connector*/sync/search modules).

Tiny real model bundles (EfficientNet-Lite0 at 32 px, dim 16, random weights: exported in a second),
embedding shards written with pyarrow exactly as docs/contracts.md describes, and one Milvus Lite
``.db`` per test in ``tmp_path``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from deepfeat.connectors import MilvusConnector, connect
from deepfeat.finetune.models.bundle import ModelBundle, export_bundle
from deepfeat.finetune.models.model import build_embedding_model

DIM = 16


def make_bundle(path: Path, *, seed: int = 0, dim: int = DIM, name: str | None = None) -> Path:
    """Export a tiny real bundle (random weights from ``seed``) to ``path``."""
    import torch

    torch.manual_seed(seed)
    model = build_embedding_model("tf_efficientnet_lite0", weights="none", image_size=32, embedding_dim=dim)
    return export_bundle(model, path, name=name, onnx=False, torchscript=False)


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny bundle directory, shared by the session."""
    return make_bundle(tmp_path_factory.mktemp("bundles") / "tiny", seed=0, name="tiny")


@pytest.fixture(scope="session")
def other_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second bundle of the same architecture and dim but other weights (another bundle_id)."""
    return make_bundle(tmp_path_factory.mktemp("bundles") / "tiny_v2", seed=1, name="tiny_v2")


@pytest.fixture(scope="session")
def bundle(bundle_dir: Path) -> ModelBundle:
    """The loaded tiny bundle."""
    return ModelBundle.load(bundle_dir)


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[MilvusConnector]:
    """A connector on a fresh Milvus Lite database in ``tmp_path`` (its server released afterwards)."""
    c = connect(str(tmp_path / "milvus.db"))
    yield c
    c.release_lite()


def fingerprint_of(bundle_path: Path) -> dict[str, Any]:
    """The fingerprint a shard records for the bundle at ``bundle_path``."""
    from deepfeat.finetune.models.bundle import read_card

    return read_card(bundle_path).fingerprint()


def synthetic_vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """L2-normalised float32 vectors."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def record_ids(n: int, start: int = 0) -> list[str]:
    """Record ids that look like relative paths, some with quotes and spaces (Milvus Lite key traps)."""
    curly, quote = "\u2019", "'"
    return [
        f"class_{i % 4}/img {i:05d}{curly if i % 7 == 0 else ''}{'' if i % 5 else quote}.png"
        for i in range(start, start + n)
    ]


def write_shards(
    out: Path,
    fingerprint: dict[str, Any],
    vectors: np.ndarray,
    ids: list[str],
    *,
    shard_size: int = 50,
    extra: dict[str, list[Any]] | None = None,
) -> list[Path]:
    """Write ``part-NNNNN.parquet`` shards as ``deepfeat embed`` does (contracts.md)."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    dim = vectors.shape[1]
    for k, start in enumerate(range(0, len(ids), shard_size)):
        sl = slice(start, start + shard_size)
        part = ids[sl]
        cols: dict[str, Any] = {
            "id": pa.array(part, pa.string()),
            "path": pa.array([f"/data/{i}" for i in part], pa.string()),
            "label": pa.array([i.split("/")[0] for i in part], pa.string()),
            "split": pa.array(["test" if j % 3 == 0 else "train" for j in range(start, start + len(part))]),
            "is_query": pa.array([j % 3 == 0 for j in range(start, start + len(part))]),
            "is_gallery": pa.array([True] * len(part)),
            "group": pa.array([f"product_{j // 3}" for j in range(start, start + len(part))]),
            "content_hash": pa.array([f"{j:064x}" for j in range(start, start + len(part))]),
        }
        for name, values in (extra or {}).items():
            cols[name] = pa.array(values[sl])
        cols["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(vectors[sl].reshape(-1), pa.float32()), dim)
        table = pa.table(cols).replace_schema_metadata({b"deepfeat.bundle": json.dumps(fingerprint).encode()})
        path = out / f"part-{k:05d}.parquet"
        pq.write_table(table, path)
        files.append(path)
    return files


def all_rows(conn: MilvusConnector, collection: str) -> dict[str, dict[str, Any]]:
    """Every row of a collection (vectors included) by record id; fails on a duplicated record id."""
    rows: dict[str, dict[str, Any]] = {}
    for r in conn.iter_rows(collection, ["pk", "record_id", "vector", "label", "content_hash"]):
        assert r["record_id"] not in rows, f"duplicate row for {r['record_id']!r}"
        rows[r["record_id"]] = r
    return rows


def make_images(
    root: Path, n_per_class: int = 3, classes: tuple[str, ...] = ("red", "green", "blue"), seed: int = 0
) -> Path:
    """An image folder (one sub-folder per class) of small PNGs with distinct content."""
    rng = np.random.default_rng(seed)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 220), "gray": (128, 128, 128)}
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            write_image(root / c / f"{i:02d}.png", colours.get(c, (100, 100, 100)), rng)
    return root


def write_image(path: Path, colour: tuple[int, int, int], rng: np.random.Generator) -> None:
    """One 32 px image: a colour with noise (so every file's content differs)."""
    pixels = np.clip(np.asarray(colour, dtype=np.float64) + rng.normal(0, 25, (32, 32, 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
