"""Embedding on Ray Data (issue 18): a real local Ray (2 CPUs, started and stopped by this module) gives the
local path's shards: same ids, vectors (cosine >= 0.9999), content hashes, columns and fingerprint, the
same ``_report.json`` for a corrupt image, shards that ``deepfeat load`` takes unchanged, and a Ray run
killed mid-way (a real ``deepfeat embed --engine ray`` process, SIGKILL) that resumes to the clean result."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_reliability_corpus import run_cli
from test_reliability_faults import deepfeat_process, image_folder, kill_when

from deepfeat.connectors import connect, load_shards
from deepfeat.finetune.data.readers import read_records
from deepfeat.finetune.errors import DataError, ImageDecodeError, MissingExtraError
from deepfeat.finetune.inference.distributed import ActorLayout, actor_layout, embed_with_ray, import_ray
from deepfeat.finetune.inference.embed import embed_to_parquet
from deepfeat.finetune.inference.shards import read_shards
from deepfeat.finetune.models.bundle import ModelBundle

N_GOOD = 16  # 4 classes x 4 images, plus one corrupt file


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A local Ray cluster of 2 CPUs for this module; its address, for ``deepfeat embed --address``."""
    ray = pytest.importorskip("ray", reason='Ray is not installed: pip install "deepfeat[ray]"')
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 small PNGs in 4 class folders (names with spaces and a quote) and one corrupt file."""
    root = image_folder(tmp_path_factory.mktemp("ray_images") / "images", n_per_class=4)
    (root / "c1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing an image needs")
    return root


@pytest.fixture(scope="module")
def local_out(images: Path, rel_bundle: ModelBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The local path's shards of ``images``."""
    out = tmp_path_factory.mktemp("ray_local") / "shards"
    embed_to_parquet(rel_bundle, read_records(images, check_files=False), out, batch_size=4, shard_size=4,
                     progress=False)
    return out


@pytest.fixture(scope="module")
def ray_out(ray_address: str, images: Path, rel_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``deepfeat embed --engine ray`` of ``images`` (in this process, on the module's cluster)."""
    out = tmp_path_factory.mktemp("ray_clean") / "shards"
    run = run_cli("embed", "--engine", "ray", "--bundle", rel_bundle_dir, "--data", images, "--out", out,
                  "--batch-size", "4", "--shard-size", "4", "--quiet")
    assert run.rc == 0, run.err
    assert f"embedded {N_GOOD} images (1 skipped" in run.out
    return out


def _by_id(out: Path) -> tuple[dict[str, dict[str, object]], dict[str, np.ndarray], dict[str, object]]:
    rows, vectors, fingerprint = read_shards(out)  # refuses repeated or null ids
    records = {str(r["id"]): r for r in rows.to_dict("records")}
    assert len(records) == len(rows)
    return records, dict(zip(rows["id"], vectors, strict=True)), fingerprint


def test_ray_shards_equal_the_local_path(ray_out: Path, local_out: Path, rel_bundle: ModelBundle) -> None:
    ray_rows, ray_vecs, ray_fp = _by_id(ray_out)
    loc_rows, loc_vecs, loc_fp = _by_id(local_out)
    assert sorted(ray_rows) == sorted(loc_rows) and len(ray_rows) == N_GOOD
    assert ray_fp == loc_fp == rel_bundle.fingerprint()
    first_ray, first_local = sorted(ray_out.glob("part-*.parquet"))[0], sorted(local_out.glob("part-*.parquet"))[0]
    assert pq.read_schema(first_ray).equals(pq.read_schema(first_local), check_metadata=True)
    for rid, row in ray_rows.items():
        assert row == loc_rows[rid]  # path, label, split, group, content_hash, ...
        cosine = float(ray_vecs[rid] @ loc_vecs[rid] / np.linalg.norm(ray_vecs[rid]) / np.linalg.norm(loc_vecs[rid]))
        assert cosine >= 0.9999, (rid, cosine)
    # and the vectors are the bundle's embedding of each image, not something merely alike on both paths
    from deepfeat.finetune.data.images import load_image

    some = sorted(ray_rows)[:3]
    direct = rel_bundle.embed([load_image(str(ray_rows[r]["path"])) for r in some])
    np.testing.assert_allclose(np.stack([ray_vecs[r] for r in some]), direct, atol=1e-4)


def test_corrupt_image_is_reported_and_skipped_as_locally(ray_out: Path, local_out: Path) -> None:
    ray_report = json.loads((ray_out / "_report.json").read_text())
    assert ray_report == json.loads((local_out / "_report.json").read_text())
    assert ray_report["n_skipped"] == 1 and ray_report["skipped"][0]["id"] == "c1/broken.png"
    assert "c1/broken.png" not in set(read_shards(ray_out)[0]["id"])


def test_deepfeat_load_takes_the_ray_shards(ray_out: Path, tmp_path: Path) -> None:
    conn = connect(str(tmp_path / "milvus.db"))
    try:
        report = load_shards(conn, "items", ray_out, progress=False)
        assert (report.rows_written, report.final_count, report.verified) == (N_GOOD, N_GOOD, True)
    finally:
        conn.release_lite()


def _check_ray_kills(out: Path, clean: Path, images: Path, bundle_dir: Path, bundle: ModelBundle, address: str,
                     log: Path, targets: list[int]) -> None:
    """Run ``deepfeat embed --engine ray`` into ``out`` and SIGKILL it once ``targets[k]`` shards are there (one
    run per target), then finish in this process and compare with the clean run's shards in ``clean``."""
    args = ["embed", "--engine", "ray", "--address", address, "--bundle", bundle_dir, "--data", images,
            "--out", out, "--batch-size", "1", "--shard-size", "1", "--quiet"]

    def shards() -> list[Path]:
        return sorted(out.glob("part-*.parquet")) if out.exists() else []

    for k, target in enumerate(targets):
        proc = deepfeat_process(args, log.with_suffix(f".{k}.log"))
        assert kill_when(proc, lambda t=target: len(shards()) >= t), log.with_suffix(f".{k}.log").read_text()[-2000:]
        partial = [i for f in shards() for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]
        assert len(partial) == len(set(partial)) < N_GOOD  # every shard there is complete; none repeats an id

    done = len(read_shards(out)[0])
    result = embed_with_ray(bundle, read_records(images, check_files=False), out, batch_size=4, shard_size=4,
                            progress=False)
    assert result.n_embedded == N_GOOD - done and result.n_skipped == 1
    rows, vecs, fp = _by_id(out)
    clean_rows, clean_vecs, clean_fp = _by_id(clean)
    assert sorted(rows) == sorted(clean_rows) and fp == clean_fp  # no gap, no duplicate
    np.testing.assert_allclose(np.stack([vecs[r] for r in clean_rows]), np.stack(list(clean_vecs.values())),
                               atol=1e-5)
    assert json.loads((out / "_report.json").read_text())["n_skipped"] == 1
    assert [p.name for p in out.iterdir() if not p.name.startswith("part-")] == ["_report.json"]


def test_killed_ray_embed_resumes_to_the_clean_result(
    ray_address: str, ray_out: Path, images: Path, rel_bundle_dir: Path, rel_bundle: ModelBundle, tmp_path: Path
) -> None:
    _check_ray_kills(tmp_path / "killed", ray_out, images, rel_bundle_dir, rel_bundle, ray_address,
                     tmp_path / "killed.log", targets=[3])


@pytest.mark.slow
def test_ray_embed_killed_at_seeded_points_resumes_to_the_clean_result(
    ray_address: str, ray_out: Path, images: Path, rel_bundle_dir: Path, rel_bundle: ModelBundle, tmp_path: Path
) -> None:
    rng = np.random.default_rng(7)
    targets = np.cumsum(rng.integers(1, 4, size=3)).tolist()  # three kills, each a few shards further on
    _check_ray_kills(tmp_path / "killed", ray_out, images, rel_bundle_dir, rel_bundle, ray_address,
                     tmp_path / "killed.log", targets=targets)


def test_in_memory_images_and_skips_in_input_order_as_locally(
    ray_address: str, rel_bundle: ModelBundle, tmp_path: Path
) -> None:
    """Arrays and encoded bytes held in the records (no file) reach the CPU tasks exactly; the skips are
    listed in input order, whatever order Ray returns the batches in."""
    rng = np.random.default_rng(3)
    arrays = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    Image.fromarray(arrays[3]).save(tmp_path / "file.png")
    encoded = io.BytesIO()
    Image.fromarray(arrays[1]).save(encoded, format="PNG")
    records = pd.DataFrame({
        "id": [f"r{i}" for i in range(7)],
        "image": [arrays[0], encoded.getvalue(), b"garbage", None, arrays[2].astype(np.float64), None, None],
        "path": [None, None, None, str(tmp_path / "file.png"), None, str(tmp_path / "missing.png"), None],
        "label": list("aabbccd"),
        "price": [1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5],
    })
    records.loc[6, "path"] = str(tmp_path / "file.png")  # a second record of the same file
    ray_res = embed_with_ray(rel_bundle, records, tmp_path / "ray", batch_size=2, shard_size=3, progress=False)
    local = embed_to_parquet(rel_bundle, records, tmp_path / "local", batch_size=2, shard_size=3, progress=False)
    assert (ray_res.n_embedded, ray_res.n_skipped) == (local.n_embedded, local.n_skipped) == (4, 3)
    ray_rows, ray_vecs, _ = _by_id(tmp_path / "ray")
    loc_rows, loc_vecs, _ = _by_id(tmp_path / "local")
    assert ray_rows == loc_rows and sorted(ray_rows) == ["r0", "r1", "r3", "r6"]
    for rid in ray_rows:
        assert float(ray_vecs[rid] @ loc_vecs[rid]) >= 0.9999
    ray_report = json.loads((tmp_path / "ray" / "_report.json").read_text())
    assert ray_report == json.loads((tmp_path / "local" / "_report.json").read_text())
    assert [s["id"] for s in ray_report["skipped"]] == ["r2", "r4", "r5"]
    with pytest.raises(ImageDecodeError, match=r"cannot read image .*\(run with --on-error skip"):
        embed_with_ray(rel_bundle, records, tmp_path / "fail", batch_size=2, on_error="fail", progress=False)


def test_ray_refusals(ray_address: str, images: Path, rel_bundle_dir: Path, rel_bundle: ModelBundle,
                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = run_cli("embed", "--bundle", rel_bundle_dir, "--data", images, "--out", tmp_path / "o", "--address", "auto")
    assert run.rc == 2 and "is for --engine ray" in run.err
    run = run_cli("embed", "--bundle", rel_bundle_dir, "--data", images, "--out", tmp_path / "o", "--threads", "2")
    assert run.rc == 2 and "--threads 2 is for --engine ray" in run.err and not (tmp_path / "o").exists()
    records = read_records(images, check_files=False)
    with pytest.raises(DataError, match="batch_size must be at least 1"):
        embed_with_ray(rel_bundle, records, tmp_path / "o", batch_size=0)
    monkeypatch.setitem(sys.modules, "ray", None)  # as where Ray is not installed
    with pytest.raises(MissingExtraError, match=r'pip install "deepfeat\[ray\]"'):
        import_ray()


def test_actor_layout_one_single_threaded_reading_actor_per_core_or_one_actor_per_gpu() -> None:
    # CPU clusters: an actor per core, one thread and one CPU each (benchmarks/embed_ray.py: one actor of two
    # threads on 2 cores ran at 0.70-0.76x the local path, two single-threaded ones at 0.83-0.97x)
    assert actor_layout(2, 0) == ActorLayout(actors=2, gpus=0.0, cpus=1.0, threads=1, decode_tasks=False)
    assert actor_layout(64, 0) == ActorLayout(actors=64, gpus=0.0, cpus=1.0, threads=1)
    assert actor_layout(2, 0).device == "cpu"
    # fewer actors than cores share the cores as threads; more than cores reserve a fraction, never a whole CPU
    assert actor_layout(16, 0, concurrency=4) == ActorLayout(actors=4, gpus=0.0, cpus=1.0, threads=4)
    assert actor_layout(2, 0, concurrency=8) == ActorLayout(actors=8, gpus=0.0, cpus=0.25, threads=1)
    assert actor_layout(2, 0, concurrency=1, threads=3).threads == 3
    assert actor_layout(2, 0, concurrency=30_000).cpus == 0.0001  # Ray's smallest fraction, not zero
    # GPU clusters: one actor per GPU, no CPU reserved (the cores decode for them)
    assert actor_layout(32, 4) == ActorLayout(actors=4, gpus=1.0, cpus=0.0, threads=1, decode_tasks=True)
    assert actor_layout(32, 4).device == "cuda"
    assert actor_layout(32, 4, num_gpus=0.5) == ActorLayout(actors=8, gpus=0.5, cpus=0.0, threads=1,
                                                            decode_tasks=True)
    assert actor_layout(32, 4, num_gpus=0).device == "cpu"  # CPU actors on a GPU cluster, asked for
    assert actor_layout(8, 0, num_gpus=1).actors == 1  # an autoscaling cluster adds the GPU node
    # CPU actors fed by decoding tasks (as GPU actors are) leave half of the CPUs to the tasks
    assert actor_layout(2, 0, decode_tasks=True) == ActorLayout(actors=2, gpus=0.0, cpus=0.5, threads=1,
                                                                decode_tasks=True)
    assert actor_layout(2, 0, concurrency=1, decode_tasks=True).cpus == 1.0


def test_decoding_tasks_feeding_the_actors_give_the_local_vectors(
    ray_address: str, images: Path, local_out: Path, rel_bundle: ModelBundle, tmp_path: Path
) -> None:
    # the shape of the GPU pipeline (CPU tasks decode, actors embed), run here on CPU actors
    records = read_records(images, check_files=False)
    res = embed_with_ray(rel_bundle, records, tmp_path / "tasks", batch_size=4, shard_size=4, decode_tasks=True,
                         progress=False)
    assert (res.n_embedded, res.n_skipped) == (N_GOOD, 1)
    rows, vecs, _ = _by_id(tmp_path / "tasks")
    local_rows, local_vecs, _ = _by_id(local_out)
    assert rows.keys() == local_rows.keys()
    for key, vec in vecs.items():
        ref = local_vecs[key]
        assert float(vec @ ref / np.linalg.norm(vec) / np.linalg.norm(ref)) >= 0.9999, key
        assert rows[key]["content_hash"] == local_rows[key]["content_hash"]
    report = json.loads((tmp_path / "tasks" / "_report.json").read_text())
    assert report == json.loads((local_out / "_report.json").read_text())
