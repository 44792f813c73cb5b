"""Issue 7, faults: SIGKILL and resume (embed, sync, training), Milvus down or dropping connections, a
locked Milvus Lite folder, a full disk, and credentials that must never reach logs, cards or reports.

Kill points are drawn from a seeded generator and taken from the run's own progress (shards on disk,
the progress bar, checkpoint files), not from wall-clock guesses, so the tests do not depend on the
speed of a shared machine. Every killed run is a real ``deepfeat`` process (SIGKILL: no clean-up code
runs); the final runs are compared with a clean, uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from support.connectors import fingerprint_of, write_shards
from support.reliability import _png_bytes, _rng_image
from test_reliability_corpus import milvus_rows, run_cli

from deepfeat.connectors import connect, sync_records
from deepfeat.finetune.errors import ConnectorError
from deepfeat.finetune.inference.embed import read_shards
from deepfeat.finetune.models.bundle import ModelBundle, read_card

SEED = 7


def image_folder(root: Path, n_per_class: int, classes: int = 4, seed: int = 0) -> Path:
    """``root/c<k>/<i> name.png``: small distinct PNGs (names with spaces and a quote)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            (root / f"c{c}" / f"{i:03d} it's.png").write_bytes(_png_bytes(_rng_image(rng)))
    return root


def deepfeat_process(args: list[str | Path], log: Path) -> subprocess.Popen[bytes]:
    """A real ``deepfeat`` process (its own session, so the kill takes any child with it)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "deepfeat.recipes.cli", *map(str, args)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def kill_when(proc: subprocess.Popen[bytes], ready: Callable[[], bool], *, timeout: float = 240.0) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()``; False when it ended on its own first."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if ready():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                return True
            if proc.poll() is not None:
                return False
            time.sleep(0.005)
        raise AssertionError(f"the run made no progress in {timeout}s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)


# --------------------------------------------------------------------------------------------------
# deepfeat embed: killed, re-run, compared with a clean run


def _shard_files(out: Path) -> list[Path]:
    return sorted(out.glob("part-*.parquet"))


def _check_embed_kills(tmp_path: Path, bundle_dir: Path, bundle: ModelBundle, n_kills: int) -> None:
    images = image_folder(tmp_path / "images", n_per_class=15)
    n = 60
    clean = tmp_path / "clean"
    args: list[str | Path] = [
        "--bundle",
        bundle_dir,
        "--data",
        images,
        "--batch-size",
        "2",
        "--shard-size",
        "2",
        "--num-workers",
        "0",
        "--quiet",
    ]
    assert run_cli("embed", *args, "--out", clean).rc == 0
    clean_rows, clean_vectors, _ = read_shards(clean)
    assert len(clean_rows) == n

    out, rng, kills = tmp_path / "killed", np.random.default_rng(SEED), 0
    for k in range(n_kills):
        done = len(_shard_files(out)) if out.exists() else 0
        target = done + int(rng.integers(1, 24 // n_kills))  # of 30 shards
        proc = deepfeat_process(["embed", *args, "--out", out], tmp_path / f"embed-{k}.log")
        kills += kill_when(proc, lambda t=target: out.exists() and len(_shard_files(out)) >= t)  # type: ignore[misc]
        # whatever the moment of the kill: every shard there is complete and readable, none repeats an id
        ids = [i for f in _shard_files(out) for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]
        assert len(ids) == len(set(ids)) < n
    assert kills == n_kills, "every run was killed mid-way"

    final = run_cli("embed", *args, "--out", out)
    assert final.rc == 0, final.err
    rows, vectors, fingerprint = read_shards(out)
    assert fingerprint == bundle.fingerprint()
    assert len(rows) == n and sorted(rows["id"]) == sorted(clean_rows["id"])  # union == all, no duplicates
    ref = dict(zip(clean_rows["id"], clean_vectors, strict=True))
    np.testing.assert_allclose(vectors, np.stack([ref[i] for i in rows["id"]]), atol=1e-6)
    # the final run leaves no temporary file (one of a killed write is never read: not a part-*.parquet)
    assert [p.name for p in out.iterdir() if not p.name.startswith("part-")] == ["_report.json"]


def test_killed_embed_resumes_to_the_clean_result(
    tmp_path: Path, rel_bundle_dir: Path, rel_bundle: ModelBundle
) -> None:
    _check_embed_kills(tmp_path, rel_bundle_dir, rel_bundle, n_kills=1)


@pytest.mark.slow
def test_embed_killed_three_times_resumes_to_the_clean_result(
    tmp_path: Path, rel_bundle_dir: Path, rel_bundle: ModelBundle
) -> None:
    _check_embed_kills(tmp_path, rel_bundle_dir, rel_bundle, n_kills=3)


def test_embed_after_a_removed_shard_never_overwrites_a_complete_one(tmp_path: Path, rel_bundle_dir: Path) -> None:
    images = image_folder(tmp_path / "images", n_per_class=3)
    out = tmp_path / "s"
    args = [
        "embed",
        "--bundle",
        rel_bundle_dir,
        "--data",
        images,
        "--out",
        out,
        "--batch-size",
        "2",
        "--shard-size",
        "2",
        "--num-workers",
        "0",
        "--quiet",
    ]
    assert run_cli(*args).rc == 0
    before = {f.name: pq.read_table(f).column("id").to_pylist() for f in _shard_files(out)}
    (out / "part-00001.parquet").unlink()  # a user removed one shard: its records must be embedded again
    assert run_cli(*args).rc == 0
    rows = read_shards(out)[0]
    assert sorted(rows["id"]) == sorted(i for ids in before.values() for i in ids)
    for name, ids in before.items():  # every other shard is untouched
        if name != "part-00001.parquet":
            assert pq.read_table(out / name).column("id").to_pylist() == ids


# --------------------------------------------------------------------------------------------------
# deepfeat sync: killed at seeded points of its progress, re-run, compared with a clean run


def _progress(log: Path) -> tuple[int, int]:
    """The last ``n/total`` of the embedding progress bar in a run's output."""
    try:
        found = re.findall(r"(\d+)/(\d+) \[", log.read_text(errors="replace"))
    except OSError:
        return 0, 0
    return (int(found[-1][0]), int(found[-1][1])) if found else (0, 0)


def _check_sync_kills(tmp_path: Path, bundle_dir: Path, n_kills: int, n_per_class: int) -> None:
    images = image_folder(tmp_path / "images", n_per_class=n_per_class)
    n = 4 * n_per_class
    common: list[str | Path] = [
        "--bundle",
        bundle_dir,
        "--collection",
        "items",
        "--batch-size",
        "4",
        "--index",
        "HNSW:M=8",
    ]
    assert run_cli("sync", images, *common, "--uri", tmp_path / "clean.db", "--no-progress").rc == 0
    clean = milvus_rows(tmp_path / "clean.db", "items")
    assert len(clean) == n

    db, rng, kills, partial = tmp_path / "killed.db", np.random.default_rng(SEED), 0, 0
    for k in range(n_kills):
        fraction = float(rng.uniform(0.15, 0.85))
        log = tmp_path / f"sync-{k}.log"
        proc = deepfeat_process(["sync", images, *common, "--uri", db], log)

        def ready(log: Path = log, fraction: float = fraction) -> bool:
            done, total = _progress(log)
            return total > 0 and done >= fraction * total

        kills += kill_when(proc, ready)
        rows = milvus_rows(db, "items")  # opens: the killed process's lock died with it
        assert set(rows) <= set(clean)  # no stray rows; no duplicates (milvus_rows checks)
        for rid, row in rows.items():
            np.testing.assert_allclose(row["vector"], clean[rid]["vector"], atol=1e-6)
        partial += 0 < len(rows) < n
    assert kills == n_kills and partial >= 1, (kills, partial)

    final = run_cli("sync", images, *common, "--uri", db, "--format", "json", "--no-progress")
    assert final.rc == 0, final.err
    summary = json.loads(final.out)
    assert summary["final_count"] == n and summary["deleted"] == 0 and summary["skipped"] == 0
    rows = milvus_rows(db, "items")
    assert sorted(rows) == sorted(clean)
    for rid in clean:
        np.testing.assert_allclose(rows[rid]["vector"], clean[rid]["vector"], atol=1e-6)
        assert rows[rid]["content_hash"] == clean[rid]["content_hash"] and rows[rid]["pk"] == clean[rid]["pk"]
    again = json.loads(run_cli("sync", images, *common, "--uri", db, "--format", "json", "--no-progress").out)
    assert (again["added"], again["updated"], again["unchanged"]) == (0, 0, n)


def test_killed_sync_resumes_to_the_clean_result(tmp_path: Path, rel_bundle_dir: Path) -> None:
    _check_sync_kills(tmp_path, rel_bundle_dir, n_kills=1, n_per_class=40)


@pytest.mark.slow
def test_sync_killed_three_times_resumes_to_the_clean_result(tmp_path: Path, rel_bundle_dir: Path) -> None:
    _check_sync_kills(tmp_path, rel_bundle_dir, n_kills=3, n_per_class=60)


# --------------------------------------------------------------------------------------------------
# deepfeat load: killed at seeded points (the resume state's own count of rows in), resumed


def _rows_in(state: Path) -> int:
    try:
        return int(json.loads(state.read_text()).get("rows_done", 0))
    except (OSError, ValueError):  # not written yet, or caught mid-replace
        return 0


def _check_load_kills(tmp_path: Path, bundle_dir: Path, n_kills: int) -> None:
    n = 1200
    ids = [f"c{i % 4}/{i:04d} it's.png" for i in range(n)]
    rng = np.random.default_rng(SEED)
    vectors = rng.normal(size=(n, read_card(bundle_dir).embedding_dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)  # as the bundle's (normalised) vectors are
    write_shards(tmp_path / "shards", fingerprint_of(bundle_dir), vectors, ids, shard_size=100)
    common: list[str | Path] = [tmp_path / "shards", "--collection", "items", "--batch-rows", "8", "--no-progress"]
    clean = run_cli("load", *common, "--uri", tmp_path / "clean.db", "--state", tmp_path / "clean.json")
    assert clean.rc == 0, clean.err
    reference = milvus_rows(tmp_path / "clean.db", "items")

    db, state, kills = tmp_path / "killed.db", tmp_path / "state.json", 0
    for k in range(n_kills):
        target = _rows_in(state) + int(rng.integers(8, (n - 100) // n_kills))
        proc = deepfeat_process(["load", *common, "--uri", db, "--state", state], tmp_path / f"load-{k}.log")

        def ready(t: int = target) -> bool:
            return _rows_in(state) >= t

        kills += kill_when(proc, ready)
        rows = milvus_rows(db, "items")  # whatever the moment: no duplicate, no stray row, exact vectors
        assert set(rows) <= set(reference) and len(rows) < n
        for rid, row in rows.items():
            np.testing.assert_array_equal(row["vector"], reference[rid]["vector"])
    assert kills == n_kills, "every run was killed mid-way"

    final = run_cli("load", *common, "--uri", db, "--state", state, "--format", "json")
    assert final.rc == 0, final.err
    report = json.loads(final.out)
    assert report["verified"] and report["final_count"] == n and report["rows_resumed"] > 0
    rows = milvus_rows(db, "items")
    assert sorted(rows) == sorted(reference) == sorted(ids)
    for rid, row in rows.items():
        np.testing.assert_array_equal(row["vector"], reference[rid]["vector"])
        assert row["pk"] == reference[rid]["pk"]


def test_killed_load_twice_resumes_to_the_clean_result(tmp_path: Path, rel_bundle_dir: Path) -> None:
    _check_load_kills(tmp_path, rel_bundle_dir, n_kills=2)


@pytest.mark.slow
def test_load_killed_at_four_points_resumes_to_the_clean_result(tmp_path: Path, rel_bundle_dir: Path) -> None:
    _check_load_kills(tmp_path, rel_bundle_dir, n_kills=4)


def test_sync_killed_before_its_index_was_built_builds_it(tmp_path: Path, rel_bundle: ModelBundle) -> None:
    from deepfeat.connectors.collection import create_collection
    from deepfeat.connectors.schema import CollectionSpec
    from deepfeat.finetune.data.readers import read_records

    images = image_folder(tmp_path / "images", n_per_class=2)
    conn = connect(str(tmp_path / "x.db"))
    try:  # the state a kill right after create_collection leaves
        create_collection(
            conn,
            CollectionSpec.from_bundle("items", rel_bundle, metadata=read_records(images)),
            index=False,
            load=False,
        )
        report = sync_records(conn, "items", images, rel_bundle, progress=False)
        assert report.final_count == 8
        assert conn.client.list_indexes("items") == ["vector"]
    finally:
        conn.release_lite()


# --------------------------------------------------------------------------------------------------
# training: SIGKILL mid-epoch, resume from the last checkpoint, the same final weights


_FIT = textwrap.dedent("""
    import sys
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from deepfeat.finetune.training.datamodule import RetrievalDataModule
    from deepfeat.finetune.training.module import MetricLearningModule

    images, run, ckpt = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else None)
    pl.seed_everything(0)
    module = MetricLearningModule(backbone="test_efficientnet", weights="none", image_size=32, embedding_dim=8,
                                  lr=0.01, freeze_bn=False)
    dm = RetrievalDataModule(source=images, val_fraction=0.25, p=3, k=2, batches_per_epoch=5, num_workers=0,
                             seed=0)
    every = ModelCheckpoint(dirpath=run + "/ckpt", filename="{step}", every_n_train_steps=3, save_top_k=-1,
                            save_last=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, deterministic=True,
                         default_root_dir=run, use_distributed_sampler=False, callbacks=[every])
    trainer.fit(module, dm, ckpt_path=ckpt)
    torch.save(module.state_dict(), run + "/final.pt")
""")


@pytest.mark.slow
def test_training_killed_mid_epoch_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """Checkpoints every 3 steps of 5-batch epochs (steps 3, 6, 9: all mid-epoch); kill after a seeded one.

    The resumed run must end with exactly the weights of the uninterrupted run: the optimizer, the
    schedule and the step come from the checkpoint, and the data module's state says how many batches of
    the epoch were done, so the P x K sampler continues with the next batch instead of the epoch's first.
    """
    import torch
    from support.imagegen import make_image_folder

    images = make_image_folder(tmp_path / "images", n_classes=4, per_class=6)
    script = tmp_path / "fit.py"
    script.write_text(_FIT)

    def fit(run: str, *ckpt: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"{run}.log").open("wb")
        return subprocess.Popen(
            [sys.executable, str(script), str(images), str(tmp_path / run), *ckpt],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    clean = fit("clean")
    step = int(np.random.default_rng(SEED).choice([3, 6]))
    killed = fit("killed")
    assert kill_when(killed, lambda: (tmp_path / "killed" / "ckpt" / f"step={step}.ckpt").exists())
    last = torch.load(tmp_path / "killed" / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] % 5 != 0 and last["global_step"] < 10, "a mid-epoch checkpoint"
    assert last["RetrievalDataModule"]["batches_done"] == last["global_step"] % 5
    assert not (tmp_path / "killed" / "final.pt").exists()
    resumed = fit("killed", "last")
    assert clean.wait(timeout=600) == 0, (tmp_path / "clean.log").read_text()[-3000:]
    assert resumed.wait(timeout=600) == 0, (tmp_path / "killed.log").read_text()[-3000:]
    want = torch.load(tmp_path / "clean" / "final.pt", weights_only=True)
    got = torch.load(tmp_path / "killed" / "final.pt", weights_only=True)
    assert want.keys() == got.keys()
    for key in want:  # deterministic CPU training: bit-identical, not merely close
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    assert "not resumable" not in (tmp_path / "killed.log").read_text()


def test_sampler_resumes_mid_epoch_with_the_next_batch() -> None:
    """The mechanism behind the training test, fast: a resumed sampler yields the rest of the epoch."""
    from deepfeat.finetune.training.sampler import PKSampler

    labels = np.repeat(np.arange(5), 4)
    full = PKSampler(labels, p=3, k=2, batches_per_epoch=6, seed=3)
    full.set_epoch(1)
    batches = list(full)
    resumed = PKSampler(labels, p=3, k=2, batches_per_epoch=6, seed=3)
    resumed.resume_at(epoch=1, batches_done=4)
    resumed.set_epoch(1)
    assert list(resumed) == batches[4:]
    assert list(resumed) == batches  # only once: the next epoch pass is whole again
    other = PKSampler(labels, p=3, k=2, batches_per_epoch=6, seed=3)
    other.resume_at(epoch=0, batches_done=4)  # a state of another epoch does not apply
    other.set_epoch(1)
    assert list(other) == batches


# --------------------------------------------------------------------------------------------------
# Milvus down, dropping connections, locked


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def dropping_server() -> Iterator[int]:
    """A TCP port that accepts every connection and closes it at once (a server dropping connections)."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = server.accept()
            except OSError:
                continue
            client.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join(timeout=5)
    server.close()


@pytest.mark.parametrize("kind", ["down", "dropping"])
def test_unreachable_server_gives_up_in_bounded_time_with_a_resume_hint(
    kind: str, tmp_path: Path, rel_bundle_dir: Path, request: pytest.FixtureRequest
) -> None:
    port = _closed_port() if kind == "down" else request.getfixturevalue("dropping_server")
    images = image_folder(tmp_path / "images", n_per_class=1)
    start = time.monotonic()
    run = run_cli(
        "sync",
        images,
        "--bundle",
        rel_bundle_dir,
        "--collection",
        "c",
        "--uri",
        f"http://127.0.0.1:{port}",
        "--retries",
        "3",
        "--timeout",
        "2",
        "--no-progress",
    )
    elapsed = time.monotonic() - start
    assert run.rc == 2
    line = run.error_line
    assert re.search(r"unreachable after 3 attempts .*nothing was written.*re-run the same command", line), line
    assert elapsed < 45, f"gave up only after {elapsed:.0f}s"


def test_connection_lost_mid_sync_says_what_is_in_then_resumes_to_the_clean_result(
    tmp_path: Path, rel_bundle: ModelBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pymilvus.exceptions import MilvusUnavailableException

    images = image_folder(tmp_path / "images", n_per_class=6)
    clean_conn = connect(str(tmp_path / "clean.db"))
    sync_records(clean_conn, "items", images, rel_bundle, batch_size=4, progress=False)
    clean_conn.release_lite()
    clean = milvus_rows(tmp_path / "clean.db", "items")

    conn = connect(str(tmp_path / "lost.db"), retries=3, backoff=0.001)
    real_upsert = conn.client.upsert
    calls = {"n": 0}

    def flaky(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2 or calls["n"] >= 4:  # a blip (retried), then the server is gone
            raise MilvusUnavailableException(message="UNAVAILABLE: connection reset by peer")
        return real_upsert(*args, **kwargs)

    monkeypatch.setattr(conn.client, "upsert", flaky)
    with pytest.raises(ConnectorError) as caught:
        sync_records(conn, "items", images, rel_bundle, batch_size=4, progress=False)
    message = str(caught.value)
    assert re.search(
        r"upsert failed: .* unreachable after 3 attempts .* the records written so far are in; re-run "
        r"the sync .*\(8 of 24 records to write were written before it\)",
        message,
    ), message
    monkeypatch.setattr(conn.client, "upsert", real_upsert)
    assert conn.count("items") == 8
    report = sync_records(conn, "items", images, rel_bundle, batch_size=4, progress=False)
    assert (report.added, report.unchanged, report.final_count) == (16, 8, 24)
    conn.release_lite()
    rows = milvus_rows(tmp_path / "lost.db", "items")
    assert sorted(rows) == sorted(clean)
    for rid in clean:
        np.testing.assert_allclose(rows[rid]["vector"], clean[rid]["vector"], atol=1e-6)


def test_locked_lite_folder_is_one_line_naming_the_lock(tmp_path: Path, rel_bundle_dir: Path) -> None:
    db = tmp_path / "held.db"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from pymilvus import MilvusClient; MilvusClient({str(db)!r}); "
            "print('open', flush=True); import time; time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        images = image_folder(tmp_path / "images", n_per_class=1)
        run = run_cli("sync", images, "--bundle", rel_bundle_dir, "--collection", "c", "--uri", db, "--no-progress")
        assert run.rc == 2
        assert re.search(
            rf"is locked by (process {holder.pid}|another process) \(lock file '.*held\.db/LOCK'\)", run.error_line
        ), run.error_line
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=60)


# --------------------------------------------------------------------------------------------------
# disk full


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 kB tmpfs mounted at ``tmp_path/disk`` (needs root on Linux)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs to fill up ({exc}); needs root on Linux")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def test_disk_full_while_writing_shards_is_a_clear_error_and_corrupts_nothing(
    tiny_disk: Path, tmp_path: Path, rel_bundle_dir: Path
) -> None:
    images = image_folder(tmp_path / "images", n_per_class=25)
    out = tiny_disk / "shards"
    args = [
        "embed",
        "--bundle",
        rel_bundle_dir,
        "--data",
        images,
        "--batch-size",
        "4",
        "--shard-size",
        "4",
        "--num-workers",
        "0",
        "--quiet",
    ]
    run = run_cli(*args, "--out", out)
    assert run.rc == 2
    assert re.search(
        r"cannot write shard '.*part-\d{5}\.parquet': .*No space left on device.*Shards written "
        r"before it are complete.*re-run",
        run.error_line,
    ), run.error_line
    shards = _shard_files(out)
    assert 0 < len(shards) < 25
    assert [p.name for p in out.iterdir() if not p.name.startswith("part-")] == []  # no temporary file left
    done = read_shards(out)[0]  # every shard on the full disk is complete and readable
    assert len(done) == 4 * len(shards)

    # nothing left to write, but no room for the skip report either: still one clear line
    run = run_cli(*args, "--out", out, "--limit", str(len(done)))
    assert run.rc == 2 and re.search(r"cannot write the skip report .*No space left on device", run.error_line)
    assert [p.name for p in out.iterdir() if not p.name.startswith("part-")] == []

    # with space again (the shards moved to a roomy disk), the run finishes what is missing
    roomy = tmp_path / "roomy"
    roomy.mkdir()
    for f in shards:
        (roomy / f.name).write_bytes(f.read_bytes())
    final = run_cli(*args, "--out", roomy)
    assert final.rc == 0, final.err
    rows = read_shards(roomy)[0]
    assert len(rows) == 100 and rows["id"].is_unique


# --------------------------------------------------------------------------------------------------
# credentials


def test_credentials_never_reach_logs_cards_reports_or_state(
    tmp_path: Path, rel_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from deepfeat.finetune.models.bundle import export_bundle

    token, password, file_token = "tok-9f2c1e-SECRET", "pw-77ab-SECRET", "file-31d0-SECRET"
    monkeypatch.setenv("DEEPFEAT_MILVUS_TOKEN", token)
    (tmp_path / "token").write_text(file_token + "\n")
    caplog.set_level(logging.DEBUG)
    images = image_folder(tmp_path / "images", n_per_class=2)
    (images / "c0" / "broken.png").write_bytes(b"")  # so that the skip reports are not empty
    outputs: list[str] = []

    run = run_cli(
        "-vv",
        "embed",
        "--bundle",
        rel_bundle_dir,
        "--data",
        images,
        "--out",
        tmp_path / "s",
        "--num-workers",
        "0",
        "--quiet",
    )
    assert run.rc == 0
    outputs += [run.out, run.err]
    for uri, extra in (
        (str(tmp_path / "lite.db"), ["--report", str(tmp_path / "report.json")]),
        (f"http://root:{password}@127.0.0.1:{_closed_port()}", ["--retries", "1"]),
        (
            f"https://root:{password}@127.0.0.1:{_closed_port()}?token={token}",
            ["--retries", "1", "--token-file", str(tmp_path / "token")],
        ),
    ):
        run = run_cli(
            "-vv",
            "sync",
            images,
            "--bundle",
            rel_bundle_dir,
            "--collection",
            "c",
            "--uri",
            uri,
            "--no-progress",
            *extra,
        )
        outputs += [run.out, run.err]
    run = run_cli(
        "-vv",
        "load",
        tmp_path / "s",
        "--collection",
        "c2",
        "--uri",
        tmp_path / "lite.db",
        "--no-progress",
        "--state",
        tmp_path / "load-state.json",
    )
    assert run.rc == 0, run.err
    outputs += [run.out, run.err]
    conn = connect(f"https://root:{password}@h:19530", token_file=tmp_path / "token")
    outputs += [repr(conn), conn.display_uri]

    # a config that carries a URI with credentials and the token into a model card is scrubbed
    model = ModelBundle.load(rel_bundle_dir).model
    export_bundle(
        model,
        tmp_path / "bundle",
        name="b",
        onnx=False,
        torchscript=False,
        training={
            "milvus": {"uri": f"http://root:{password}@db:19530", "token": file_token},
            "note": f"indexed with {token}",
        },
    )
    card = (tmp_path / "bundle" / "card.json").read_text()
    assert "***" in card and read_card(tmp_path / "bundle").training["milvus"]["token"] == "***"

    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".json", ".txt", ".log", ".yaml")]
    assert {"card.json", "report.json", "_report.json", "load-state.json"} <= {p.name for p in files}
    texts = outputs + [caplog.text] + [p.read_text(errors="replace") for p in files]
    for secret in (token, password, file_token):
        leaks = [t[max(0, t.find(secret) - 80) : t.find(secret) + 80] for t in texts if secret in t]
        assert not leaks, f"{secret} leaked: {leaks}"


def test_tls_options_reach_pymilvus_and_are_refused_for_plain_http(
    tmp_path: Path, rel_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pymilvus

    from deepfeat.connectors import TLSOptions

    seen: dict[str, object] = {}

    class FakeClient:
        def __init__(self, uri: str, **kwargs: object) -> None:
            seen.update(kwargs, uri=uri)

    monkeypatch.setattr(pymilvus, "MilvusClient", FakeClient)
    with pytest.raises(ConnectorError, match=r"TLS file .*ca\.pem' \(ca pem\) is missing, not a regular file"):
        connect("https://milvus.internal:19530", tls=TLSOptions(ca_pem_path=str(tmp_path / "ca.pem")))
    monkeypatch.setenv("DEEPFEAT_MILVUS_TOKEN", "root:Milvus")
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("ca.pem", "c.pem", "c.key"):
        (certs / name).write_text("-----BEGIN CERTIFICATE-----\n")  # read by gRPC, not here
    tls = TLSOptions(
        ca_pem_path=f"{certs}/ca.pem",
        client_pem_path=f"{certs}/c.pem",
        client_key_path=f"{certs}/c.key",
        server_name="milvus.internal",
    )
    connect("https://milvus.internal:19530", tls=tls).client  # noqa: B018
    assert seen == {
        "uri": "https://milvus.internal:19530",
        "token": "root:Milvus",
        "db_name": "",
        "timeout": 60.0,
        "ca_pem_path": f"{certs}/ca.pem",
        "client_pem_path": f"{certs}/c.pem",
        "client_key_path": f"{certs}/c.key",
        "server_name": "milvus.internal",
        "secure": True,
    }
    images = image_folder(tmp_path / "images", n_per_class=1)
    run = run_cli(
        "sync",
        images,
        "--bundle",
        rel_bundle_dir,
        "--collection",
        "c",
        "--uri",
        f"http://127.0.0.1:{_closed_port()}",
        "--ca-pem",
        tmp_path / "ca.pem",
        "--no-progress",
    )
    assert run.rc == 2 and "which is not https://" in run.error_line
