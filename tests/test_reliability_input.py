"""Issue 22, bad input tried as a hostile user would, through the real ``deepfeat`` CLI: one case per class
fixed at the library level.

Damaged images that decoders accept silently (a JPEG cut short that keeps its end marker, a float TIFF
with NaN/inf) are skipped and named, or stop ``--on-error fail``; an edited bundle card is refused; an
index parameter out of range is refused before a collection exists; a password containing ``@``, ``:``
or ``/`` never shows; pymilvus' and Milvus Lite's own tracebacks never reach the terminal; ``classify``
against an empty collection says so instead of predicting ``None`` for everything.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_reliability_corpus import embed_cli, milvus_rows, run_cli
from test_reliability_support import _png_bytes, _rng_image

from deepfeat.connectors import CollectionSpec, connect, create_collection

pytest_plugins = ("test_reliability_support",)  # rel_bundle_dir, rel_bundle


def _cut_jpeg(seed: int) -> bytes:
    """A real JPEG with the second half of its scan data gone and the end-of-image marker put back."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:48, 0:64]
    pixels = np.clip(np.stack([x * 4, y * 5, (x + y) * 2], -1) + rng.normal(0, 10, (48, 64, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    return data[: len(data) // 2] + b"\xff\xd9"


def _nan_tiff(path: Path) -> None:
    values = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    values[7, 9] = np.nan
    Image.fromarray(values, mode="F").save(path)


@pytest.fixture()
def damaged_folder(tmp_path: Path) -> Path:
    root = tmp_path / "images" / "a"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(3):
        (root / f"good{k}.png").write_bytes(_png_bytes(_rng_image(rng)))
    (root / "cut.jpg").write_bytes(_cut_jpeg(1))
    _nan_tiff(root / "nan.tif")
    return tmp_path / "images"


def test_damaged_images_are_skipped_and_named_or_stop_fail_mode(
    damaged_folder: Path, rel_bundle_dir: Path, tmp_path: Path
) -> None:
    run = embed_cli(rel_bundle_dir, damaged_folder, tmp_path / "shards", "--on-error", "skip")
    assert run.rc == 0, run.err
    report = json.loads((tmp_path / "shards" / "_report.json").read_text())
    reasons = {Path(s["id"]).name if "/" in s["id"] else s["id"]: s["reason"] for s in report["skipped"]}
    assert report["n_skipped"] == 2, reasons
    assert any("cut" in k and "damaged JPEG" in v and "truncated" in v for k, v in reasons.items()), reasons
    assert any("nan" in k and "NaN or infinite" in v for k, v in reasons.items()), reasons
    failed = embed_cli(rel_bundle_dir, damaged_folder, tmp_path / "fail", "--on-error", "fail")
    assert failed.rc == 2 and ("cut.jpg" in failed.error_line or "nan.tif" in failed.error_line)


def test_sync_and_search_image_refuse_the_damaged_files(damaged_folder: Path, rel_bundle_dir: Path,
                                                        tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    run = run_cli("sync", damaged_folder, "--bundle", rel_bundle_dir, "--collection", "c", "--uri", db,
                  "--no-progress")
    assert run.rc == 0, run.err
    assert {Path(str(r["path"])).name for r in milvus_rows(db, "c").values()} == {"good0.png", "good1.png",
                                                                                  "good2.png"}
    for name in ("cut.jpg", "nan.tif"):
        query = run_cli("search", "--collection", "c", "--uri", db, "--bundle", rel_bundle_dir, "--image",
                        damaged_folder / "a" / name)
        assert query.rc == 2 and name in query.error_line


@pytest.mark.parametrize(("field", "value"), [("embedding_dim", 16), ("mean", [0.1, 0.1, 0.1])])
def test_an_edited_bundle_card_is_refused(
    field: str, value: object, rel_bundle_dir: Path, damaged_folder: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(rel_bundle_dir, bundle)
    card = json.loads((bundle / "card.json").read_text())
    (card["preprocessing"] if field == "mean" else card)[field] = value
    (bundle / "card.json").write_text(json.dumps(card))
    run = embed_cli(bundle, damaged_folder, tmp_path / "shards")
    assert run.rc == 2 and "was edited after export" in run.error_line and "Re-export the bundle" in run.error_line
    assert not (tmp_path / "shards").exists() or not list((tmp_path / "shards").glob("*.parquet"))


@pytest.mark.parametrize("index", ["HNSW:M=0", "HNSW:M=-3", "IVF_FLAT:nlist=0", "HNSW:efConstruction=abc",
                                   "HNSW:efconstruction=64"])
def test_invalid_index_parameters_are_refused_before_the_collection_exists(
    index: str, rel_bundle_dir: Path, damaged_folder: Path, tmp_path: Path
) -> None:
    shards = tmp_path / "shards"
    assert embed_cli(rel_bundle_dir, damaged_folder, shards).rc == 0
    db = tmp_path / "m.db"
    run = run_cli("load", shards, "--collection", "c", "--uri", db, "--index", index, "--no-progress")
    assert run.rc == 2 and index.split(":")[1].split("=")[0] in run.error_line
    assert "verified" not in run.out
    conn = connect(str(db))
    try:
        assert not conn.has_collection("c")
    finally:
        conn.close()


@pytest.mark.parametrize("password", ["pa@SECRETPART", "pa:SECRET/PART", "pa/SECRET@PART:x"])
def test_a_password_never_shows_whatever_it_holds(password: str) -> None:
    run = run_cli("collections", "list", "--uri", f"http://root:{password}@127.0.0.1:1", "--retries", "1",
                  "--timeout", "1")
    assert run.rc == 2
    assert "http://***@127.0.0.1:1" in run.error_line
    for fragment in ("SECRET", "PART", "pa@", "pa:", "pa/"):
        assert fragment not in run.err + run.out, fragment


def test_milvus_tracebacks_never_reach_the_terminal(
    rel_bundle_dir: Path, damaged_folder: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "m.db"
    assert run_cli("sync", damaged_folder, "--bundle", rel_bundle_dir, "--collection", "c", "--uri", db,
                   "--no-progress").rc == 0
    capfd.readouterr()
    run = run_cli("search", "--collection", "c", "--uri", db, "--id", "a/good0.png", "--filter", "label >>> 3")
    seen = capfd.readouterr()
    assert run.rc == 2 and "unexpected token" in run.error_line, run.err
    for text in (run.err, seen.err, seen.out):
        assert "Traceback" not in text and "_log_rpc_error" not in text
    # a corrupt .db (a schema file that is not JSON), opened by a fresh process: this one serves it still
    corrupt = tmp_path / "corrupt.db"
    shutil.copytree(db, corrupt)
    (next((corrupt / "collections").iterdir()) / "schema.json").write_text("not json")
    proc = subprocess.run([sys.executable, "-m", "deepfeat.recipes.cli", "collections", "list", "--uri", str(corrupt)],
                          capture_output=True, text=True, timeout=300, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "not valid JSON" in lines[0], proc.stderr
    assert lines[0].startswith("deepfeat: error:") and "Traceback" not in proc.stdout


def test_classify_against_an_empty_collection_says_so(rel_bundle_dir: Path, damaged_folder: Path,
                                                      tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    conn = connect(str(db))
    try:
        create_collection(conn, CollectionSpec.from_bundle("empty", rel_bundle_dir))
    finally:
        conn.close()
    run = run_cli("classify", "--collection", "empty", "--uri", db, "--bundle", rel_bundle_dir, "--data",
                  damaged_folder / "a" / "good0.png")
    assert run.rc == 2 and "has no rows" in run.error_line and "deepfeat load" in run.error_line
