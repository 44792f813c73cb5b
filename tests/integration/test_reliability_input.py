"""Issue 22, bad input tried as a hostile user would, through the real ``deepfeat`` CLI: one case per class
fixed at the library level.

Damaged images that decoders accept silently (a JPEG cut short that keeps its end marker, a float TIFF
with NaN/inf) are skipped and named, or stop ``--on-error fail``; an edited bundle card is refused; an
index parameter out of range is refused before a collection exists; a password containing ``@``, ``:``
or ``/`` never shows; pymilvus' and Milvus Lite's own tracebacks never reach the terminal; ``classify``
against an empty collection says so instead of predicting ``None`` for everything.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from support.recipes import TINY
from support.reliability import _png_bytes, _rng_image
from test_reliability_corpus import embed_cli, milvus_rows, run_cli

from deepfeat.connectors import CollectionSpec, connect, create_collection
from deepfeat.recipes.cli import main
from deepfeat.recipes.config import CONFIG_DIR


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


# --------------------------------------------------------------------------------------------------
# class 1: every argument and file the CLI takes is checked at the boundary: one line, exit code 2


def usage_error(*args: str | Path) -> str:
    """The one line argparse prints for a refused argument (exit code 2, nothing else on stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert exc.value.code == 2 and len(lines) == 1, err.getvalue()
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["embed", "--batch-size", "0"], "--batch-size: must be 1 or more, got 0"),
        (["embed", "--limit", "-5"], "--limit: must be 1 or more, got -5"),
        (["embed", "--device", "tpu9"], "invalid device 'tpu9'"),
        (["embed", "--num-workers", "-1"], "cannot be negative"),
        (["load", "S", "-c", "c", "--batch-rows", "0"], "--batch-rows: must be 1 or more"),
        (["search", "-c", "c", "--id", "x", "--batch-size", "0"], "--batch-size: must be 1 or more"),
        (["search", "-c", "c", "--id", "x", "--group-size", "0"], "--group-size: must be 1 or more"),
        (["search", "-c", "c", "--id", "x", "--top-k", "-1"], "--top-k/-k: must be 1 or more"),
        (["search", "-c", "c", "--id", "x", "--search-params", "[1, 2]"], "expected a JSON object"),
        (["search", "-c", "c", "--id", "x", "--search-params", "{ef: 1}"], "not JSON"),
        (["evaluate", "--config", "x", "--limit-per-class", "-1"], "--limit-per-class: must be 0 or more"),
        (["cluster", "-c", "c", "--k", "0"], "--k: must be 1 or more"),
        (["recipe", "run", "x", "--minutes", "-2"], "--minutes: must be a finite number > 0"),
        (["collections", "list", "--timeout", "inf"], "--timeout: must be a finite number > 0"),
    ],
)
def test_out_of_range_arguments_are_one_usage_line(argv: list[str], expected: str, tmp_path: Path) -> None:
    if argv[0] == "embed":
        argv = [*argv, "--bundle", "b", "--data", "d", "--out", str(tmp_path / "o")]
    line = usage_error(*argv)
    assert line.startswith(f"deepfeat {argv[0] if argv[0] != 'recipe' else 'recipe run'}: error: argument --")
    assert expected in line, line


def test_outputs_that_name_the_wrong_kind_of_path_are_refused(tmp_path: Path) -> None:
    folder, file = tmp_path / "folder", tmp_path / "file.csv"
    folder.mkdir()
    file.write_text("x")
    assert "is a folder, and a file is written here" in usage_error("dedup", "-c", "c", "--out", folder)
    assert "the folder of" in usage_error("classify", "-c", "c", "--out", file / "p.csv")
    assert "is an existing file, and a folder is written here" in usage_error(
        "embed", "--bundle", "b", "--data", "d", "--out", file)


def _write_vector_file(kind: str, folder: Path) -> Path:
    if kind == "folder.npy":
        (folder / kind).mkdir()
    elif kind == "fifo.npy":
        os.mkfifo(folder / kind)
    elif kind.endswith(".json"):
        text = {"bad.json": "[[1, 2,", "ragged.json": "[[1, 2], [3]]", "words.json": '["a", "b"]',
                "bools.json": "[true, false, true]", "object.json": '{"v": [1, 2]}'}[kind]
        (folder / kind).write_text(text)
    elif kind == "garbage.npy":
        (folder / kind).write_bytes(b"not a numpy file at all")
    elif kind == "zero.npy":
        (folder / kind).write_bytes(b"")
    elif kind == "object.npy":
        np.save(folder / kind, np.array([1, "a", None], dtype=object), allow_pickle=True)
    elif kind == "cut.npy":
        np.save(folder / kind, np.zeros((50, 8), dtype=np.float32))
        (folder / kind).write_bytes((folder / kind).read_bytes()[:200])
    elif kind == "nan.npy":
        np.save(folder / kind, np.array([1.0, np.nan, 0.0], dtype=np.float32))
    elif kind == "cube.npy":
        np.save(folder / kind, np.zeros((2, 2, 2), dtype=np.float32))
    return folder / kind


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("garbage.npy", "is not a .npy file"),
        ("zero.npy", "is not a .npy file"),
        ("object.npy", "Object arrays cannot be loaded"),
        ("cut.npy", "not a readable numeric .npy array"),
        ("nan.npy", "NaN or infinite"),
        ("cube.npy", "shape (2, 2, 2)"),
        ("bad.json", "is not JSON"),
        ("ragged.json", "rows of different lengths"),
        ("words.json", "values that are not numbers"),
        ("bools.json", "true/false values"),
        ("object.json", "values that are not numbers"),
        ("folder.npy", "is a folder, not a regular file"),
        ("fifo.npy", "is a FIFO (named pipe), not a regular file"),
    ],
)
def test_a_vector_file_that_is_not_a_numeric_array_is_one_line_naming_it(kind: str, reason: str,
                                                                         tmp_path: Path) -> None:
    path = _write_vector_file(kind, tmp_path)
    run = run_cli("search", "-c", "c", "--uri", tmp_path / "m.db", "--vector-file", path)
    assert run.rc == 2 and f"vector file {str(path)!r}" in run.error_line and reason in run.error_line, run.err
    assert not (tmp_path / "m.db").exists()  # refused before Milvus was opened


def test_config_files_with_bad_yaml_or_keys_are_one_line_naming_the_file_and_the_fix(
    rel_bundle_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("data:\n  source: images\n  fractions: [0.5, 0.5\n")
    for argv in (["evaluate", "--config", broken, "--bundle", rel_bundle_dir], ["recipe", "show", broken]):
        run = run_cli(*argv)
        assert run.rc == 2 and f"{str(broken)!r} is not valid YAML at line 4" in run.error_line, run.err
    listed = tmp_path / "list.yaml"
    listed.write_text("- data\n- model\n")
    assert "is not a YAML mapping (got list)" in run_cli("evaluate", "--config", listed, "--bundle",
                                                         rel_bundle_dir).error_line
    misspelt = tmp_path / "misspelt.yaml"
    misspelt.write_text("data:\n  sourse: images\n")
    run = run_cli("evaluate", "--config", misspelt, "--bundle", rel_bundle_dir)
    assert run.rc == 2 and "unknown key 'data.sourse'; did you mean 'data.source'?" in run.error_line, run.err


# --------------------------------------------------------------------------------------------------
# class 2: nothing bad silently accepted


def _recipe_with(tmp_path: Path, old: str, new: str) -> Path:
    text = (CONFIG_DIR / "dedup.yaml").read_text()
    assert old in text
    path = tmp_path / "edited.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize(
    ("how", "key", "nearest"),
    [
        ("set", "model.imge_size=32", "model.image_size"),
        ("set", "trainer.max_epoch=2", "trainer.max_epochs"),
        ("set", "data.sourse=x", "data.source"),
        ("set", "recipe.serch.top_k=3", "recipe.search.top_k"),
        ("yaml", "  image_size:", "model.image_size"),
        ("yaml", "  max_epochs:", "trainer.max_epochs"),
    ],
)
def test_an_unknown_config_key_is_refused_with_the_nearest_name_on_every_path(
    how: str, key: str, nearest: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # were the key accepted: a tiny run, and its files here
    config = CONFIG_DIR / "dedup.yaml" if how == "set" else _recipe_with(tmp_path, key, key.replace("_", "", 1))
    sets = [*TINY, key] if how == "set" else list(TINY)
    paths = [["recipe", "show", config, "--set", *sets], ["recipe", "run", config, "--out", tmp_path / "o",
                                                          "--set", *sets]]
    if not key.startswith("recipe."):  # fit takes the recipe section as a free mapping (it ignores it)
        paths.append(["fit", "--config", config, *(f"--{s}" for s in sets)])
    for argv in paths:
        run = run_cli(*argv)
        assert run.rc == 2 and f"did you mean {nearest!r}?" in run.error_line, (argv, run.err)
    assert not (tmp_path / "o" / "recipe.json").exists()


def test_repeated_set_flags_accumulate() -> None:
    run = run_cli("recipe", "show", "dedup", "--set", "model.backbone=test_efficientnet", "model.weights=none",
                  "--set", "recipe.train=false", "--set", "model.image_size=48", "--set", "trainer.max_epochs=3")
    assert run.rc == 0, run.err
    shown = yaml.safe_load(run.out)
    assert shown["recipe"]["train"] is False and shown["model"]["image_size"] == 48
    assert shown["trainer"]["max_epochs"] == 3 and shown["model"]["backbone"] == "test_efficientnet"


def test_evaluate_on_an_empty_split_says_the_split_is_empty(rel_bundle_dir: Path, damaged_folder: Path,
                                                             tmp_path: Path) -> None:
    folder = tmp_path / "two"
    shutil.copytree(damaged_folder / "a", folder / "a")
    for name in ("cut.jpg", "nan.tif"):
        (folder / "a" / name).unlink()
    config = tmp_path / "eval.yaml"
    config.write_text(f"data:\n  source: {folder}\n  split_mode: as_is\n")  # a folder's rows are all 'train'
    run = run_cli("evaluate", "--config", config, "--bundle", rel_bundle_dir, "--baseline-weights", "none",
                  "--num-workers", "0")
    assert run.rc == 2 and "holds no records" in run.error_line and "decoded" not in run.error_line


def test_a_fifo_given_as_data_is_called_a_fifo(rel_bundle_dir: Path, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    run = embed_cli(rel_bundle_dir, tmp_path / "pipe", tmp_path / "out")
    assert run.rc == 2 and "is a FIFO (named pipe)" in run.error_line and "missing" not in run.error_line


def test_load_after_rows_were_deleted_says_restart_and_restart_restores_them(
    rel_bundle_dir: Path, damaged_folder: Path, tmp_path: Path
) -> None:
    shards, db = tmp_path / "shards", tmp_path / "m.db"
    assert embed_cli(rel_bundle_dir, damaged_folder, shards).rc == 0
    load = ("load", shards, "--collection", "c", "--uri", db, "--no-progress")
    assert run_cli(*load).rc == 0
    conn = connect(str(db))
    try:
        conn.client.delete("c", filter='record_id == "a/good1.png"')
    finally:
        conn.close()
    again = run_cli(*load)
    assert again.rc == 2 and "--restart" in again.error_line and "re-run the load" not in again.error_line
    assert run_cli(*load, "--restart").rc == 0
    assert sorted(milvus_rows(db, "c")) == ["a/good0.png", "a/good1.png", "a/good2.png"]


# --------------------------------------------------------------------------------------------------
# classes 3 and 4 through the real console script: no secret fragment anywhere, nothing foreign on stderr

DEEPFEAT = Path(sys.executable).parent / "deepfeat"
PASSWORD_URI = "http://root:pa@SE:CRET/x@127.0.0.1:1"
FRAGMENTS = ("SE:CRET", "CRET", "pa@SE", "SE:", "/x@")


def deepfeat_command(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed ``deepfeat`` command, as a user runs it (its own process, its own terminal streams)."""
    return subprocess.run([str(DEEPFEAT), *map(str, args)], capture_output=True, text=True, timeout=900, cwd=cwd,
                          check=False)


def only_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """stderr is exactly one ``deepfeat: error:`` line (exit code 2): no log line, warning or traceback of
    another package before it."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("deepfeat: error:"), proc.stderr
    return lines[0]


def class_folder(root: Path, classes: int = 4, per_class: int = 10) -> Path:
    rng = np.random.default_rng(3)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            (root / f"c{c}" / f"{i}.png").write_bytes(_png_bytes(_rng_image(rng)))
    return root


def _no_secret_anywhere(proc: subprocess.CompletedProcess[str], out: Path) -> None:
    texts = [proc.stdout, proc.stderr]
    texts += [p.read_text(errors="replace") for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".csv",
                                                                                                       ".yaml", ".txt")]
    for text in texts:
        for fragment in FRAGMENTS:
            assert fragment not in text, (fragment, text[:500])


def test_a_bad_filter_through_the_real_command_is_one_line(rel_bundle_dir: Path, damaged_folder: Path,
                                                           tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    assert run_cli("sync", damaged_folder, "--bundle", rel_bundle_dir, "--collection", "c", "--uri", db,
                   "--no-progress").rc == 0
    assert len(milvus_rows(db, "c")) == 3  # and this process lets go of the .db (one process at a time)
    proc = deepfeat_command("search", "-c", "c", "--uri", db, "--id", "a/good0.png", "--filter", "label >>> 3",
                            cwd=tmp_path)
    assert "unexpected token" in only_error_line(proc) and proc.stdout == ""


def test_recipe_run_prints_nothing_foreign_and_never_shows_or_stores_a_password(tmp_path: Path) -> None:
    # a real (tiny) fine-tuning in its own process: about 30 s on 2 cores
    # DataLoader workers fork after gRPC is loaded (fork_posix line), Lightning trains (LeafSpec warning, INFO
    # lines about GPUs and parameters): quiet, the user sees deepfeat's one line only
    data, out = class_folder(tmp_path / "images"), tmp_path / "out"
    proc = deepfeat_command("recipe", "run", "dedup", "--data", data, "--out", out, "--uri", PASSWORD_URI,
                            "--quiet", "--set", *TINY, "data.num_workers=2", "data.fractions=[0.4,0.3,0.3]",
                            cwd=tmp_path)
    assert "http://***@127.0.0.1:1" in only_error_line(proc)
    assert (out / "run" / "bundle" / "card.json").is_file()  # it trained and exported before it connected
    _no_secret_anywhere(proc, out)


# --------------------------------------------------------------------------------------------------
# shards handed to `deepfeat load` (class 1: damaged files; class 2: duplicate and null ids): refused, named


def _damage_shard(kind: str, good: Path, out: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir()
    target = out / "part-00000.parquet"
    if kind in ("zero", "garbage"):
        target.write_bytes(b"" if kind == "zero" else b"PAR1 this is not parquet")
        return
    table = pq.read_table(good)
    meta = table.schema.metadata
    ids = table.column("id").to_pylist()
    column = table.schema.get_field_index("id")
    if kind == "duplicate ids":
        table = table.set_column(column, "id", pa.array([ids[0], *ids[:-1]]))
    elif kind == "null ids":
        table = table.set_column(column, "id", pa.array([None, *ids[1:]], type=pa.string()))
    else:  # the bundle record of the schema metadata is not JSON
        meta = {k: (b"{not json" if k.startswith(b"deepfeat") else v) for k, v in meta.items()}
    pq.write_table(table.replace_schema_metadata(meta), target)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("zero", "is not a readable Parquet file"),
        ("garbage", "is not a readable Parquet file"),
        ("bundle record", "damaged bundle record"),
        ("duplicate ids", "occur more than once"),
        ("null ids", "with a null 'id'"),
    ],
)
def test_damaged_shards_are_refused_by_load_before_a_row_is_written(
    kind: str, reason: str, rel_bundle_dir: Path, damaged_folder: Path, tmp_path: Path
) -> None:
    good = tmp_path / "good"
    assert embed_cli(rel_bundle_dir, damaged_folder, good).rc == 0
    bad, db = tmp_path / "bad", tmp_path / "m.db"
    _damage_shard(kind, next(good.glob("part-*.parquet")), bad)
    run = run_cli("load", bad, "--collection", "c", "--uri", db, "--no-progress")
    assert run.rc == 2 and reason in run.error_line, run.err
    assert "part-00000.parquet" in run.error_line or "a/good0.png" in run.error_line
    assert milvus_rows(db, "c") == {}


def test_evaluate_names_each_skipped_image_and_why(
    rel_bundle_dir: Path, damaged_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = ["path,label,split"] + [f"{damaged_folder / 'a' / name},{'a' if 'good' in name else 'b'},test"
                                   for name in ("good0.png", "good1.png", "good2.png", "cut.jpg", "nan.tif")]
    manifest = tmp_path / "test.csv"
    manifest.write_text("\n".join(rows) + "\n")
    config = tmp_path / "eval.yaml"
    config.write_text(f"data:\n  source: {manifest}\n  split_mode: as_is\n")
    with caplog.at_level("WARNING", logger="deepfeat"):
        run = run_cli("evaluate", "--config", config, "--bundle", rel_bundle_dir, "--baseline-weights", "none",
                      "--num-workers", "0")
    assert run.rc == 0, run.err
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    for name, reason in (("cut.jpg", "truncated"), ("nan.tif", "NaN or infinite")):
        # named once per model evaluated (off-the-shelf and fine-tuned), with the reason
        assert sum(name in m and reason in m for m in skipped) == 2, skipped


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("missing", "is missing, not a regular file"), ("folder", "is a folder, not a regular file"),
     ("fifo", "is a FIFO (named pipe), not a regular file"), ("binary", "is not UTF-8 text"), ("empty", "is empty")],
)
def test_a_token_file_that_cannot_hold_a_token_is_one_line_and_never_blocks(kind: str, reason: str,
                                                                            tmp_path: Path) -> None:
    path = tmp_path / f"token-{kind}"
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # reading it would wait for a writer forever
    elif kind != "missing":
        path.write_bytes(b"\xff\xfe\x00secret" if kind == "binary" else b"")
    run = run_cli("collections", "list", "--uri", "http://127.0.0.1:1", "--token-file", path, "--retries", "1",
                  "--timeout", "1")
    assert run.rc == 2 and f"token file {str(path)!r}" in run.error_line and reason in run.error_line, run.err
    assert "secret" not in run.err
