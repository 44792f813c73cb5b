"""Issue 7, bad input: a corpus of broken and awkward files through the real ``deepfeat`` CLI.

One image folder holds every kind of bad file the issue lists (empty, truncated JPEG/PNG, not an image,
an unsupported codec, a decompression bomb, a corrupt DICOM, a dangling symbolic link) beside good but
awkward ones (16-bit, palette, RGBA, CMYK, EXIF-rotated, animated GIF, DICOM, names with spaces, quotes,
tabs and non-ASCII characters). ``deepfeat embed --on-error skip`` and ``deepfeat sync`` must report
each bad file with its reason and store each good one with the vector of its correctly decoded pixels;
``--on-error fail`` must stop with one line naming the file. Then bad manifests, model/collection
mismatches (refused before any write), non-finite embeddings and unsafe checkpoints.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from support.reliability import DIM, Corpus, build_corpus, make_bundle

from deepfeat.connectors import connect, search_ids
from deepfeat.connectors.schema import primary_key
from deepfeat.finetune.errors import DataError, ModelError
from deepfeat.finetune.inference.embed import read_shards
from deepfeat.finetune.models.bundle import ModelBundle
from deepfeat.recipes.cli import main


@dataclass
class CliRun:
    """Exit code and output of one in-process ``deepfeat`` call."""

    rc: int
    out: str
    err: str

    @property
    def error_line(self) -> str:
        """The ``deepfeat: error:`` line (asserting it is the only output on stderr)."""
        lines = [line for line in self.err.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("deepfeat: error:")]
        assert len(errors) == 1, f"expected one error line, got stderr:\n{self.err}"
        assert "Traceback" not in self.err
        return errors[0]


def run_cli(*args: str | Path) -> CliRun:
    """``deepfeat ARGS`` in this process, with stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return CliRun(rc, out.getvalue(), err.getvalue())


def embed_cli(bundle: Path, data: Path, out: Path, *extra: str) -> CliRun:
    """``deepfeat embed`` of ``data`` with ``bundle`` into ``out``: no workers, no progress bar."""
    return run_cli("embed", "--bundle", bundle, "--data", data, "--out", out, "--num-workers", "0", "--quiet", *extra)


def milvus_rows(db: Path, collection: str) -> dict[str, dict[str, object]]:
    """Every row of ``collection`` by record id (asserting there are no duplicates)."""
    conn = connect(str(db))
    try:
        rows: dict[str, dict[str, object]] = {}
        if not conn.has_collection(collection):
            return rows
        for r in conn.iter_rows(collection, ["pk", "record_id", "vector", "path", "label", "content_hash"]):
            assert r["record_id"] not in rows, f"duplicate row for {r['record_id']!r}"
            rows[str(r["record_id"])] = r
        return rows
    finally:
        conn.release_lite()


# --------------------------------------------------------------------------------------------------
# the corpus through `deepfeat embed --on-error skip`


@dataclass
class Embedded:
    corpus: Corpus
    out: Path
    run: CliRun


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory, rel_bundle_dir: Path) -> Embedded:
    base = tmp_path_factory.mktemp("corpus")
    corpus = build_corpus(base / "images")
    out = base / "shards"
    run = run_cli(
        "embed",
        "--bundle",
        rel_bundle_dir,
        "--data",
        corpus.root,
        "--out",
        out,
        "--on-error",
        "skip",
        "--num-workers",
        "2",  # as on a GPU machine: bad files are met in DataLoader worker processes
        "--batch-size",
        "4",
        "--shard-size",
        "6",
        "--quiet",
    )
    return Embedded(corpus, out, run)


def test_embed_skip_reports_every_bad_file_with_its_reason(embedded: Embedded) -> None:
    run, corpus = embedded.run, embedded.corpus
    assert run.rc == 0, run.err
    assert f"embedded {len(corpus.good)} images ({len(corpus.bad)} skipped" in run.out
    report = json.loads((embedded.out / "_report.json").read_text())
    reasons = {s["id"]: s["reason"] for s in report["skipped"]}
    assert report["n_skipped"] == len(corpus.bad) == len(reasons)
    assert set(reasons) == set(corpus.bad)
    for rid, pattern in corpus.bad.items():
        assert re.search(pattern, reasons[rid]), f"{rid}: {reasons[rid]!r} does not say {pattern!r}"
        assert Path(rid).name in reasons[rid]  # the reason names the file
    skipped_sources = {s["id"]: s["source"] for s in report["skipped"]}
    assert all(Path(skipped_sources[rid]) == corpus.root / rid for rid in corpus.bad)


def test_embed_skip_stores_each_good_file_with_the_vector_of_its_correct_pixels(
    embedded: Embedded, rel_bundle: ModelBundle
) -> None:
    rows, vectors, fingerprint = read_shards(embedded.out)
    corpus = embedded.corpus
    assert fingerprint == rel_bundle.fingerprint()
    assert sorted(rows["id"]) == sorted(corpus.good), "every good file, each once"
    assert np.isfinite(vectors).all() and vectors.shape == (len(corpus.good), DIM)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    by_id = dict(zip(rows["id"], vectors, strict=True))
    for rid, pixels in corpus.good.items():
        source = pixels if pixels is not None else corpus.root / rid
        expected = rel_bundle.embed([source])[0]
        np.testing.assert_allclose(by_id[rid], expected, atol=1e-5, err_msg=rid)
    # paths are data, kept exactly (quotes, tabs, non-ASCII); ids are the relative paths
    paths = dict(zip(rows["id"], rows["path"], strict=True))
    assert all(Path(paths[rid]) == corpus.root / rid for rid in corpus.good)
    assert {'good/quote\'s "double".png', "good/日本語 ünï.png", "it's \"quoted\" é/b 'c'.png"} <= set(by_id)
    # the checks above can tell a wrong decode: ignoring EXIF, dropping alpha, or a later GIF frame differ
    exif = corpus.root / "good" / "exif rotated.png"
    from PIL import Image

    with Image.open(exif) as im:
        sideways = np.asarray(im.convert("RGB"))  # the stored pixels, without the orientation
    assert not np.allclose(rel_bundle.embed([sideways])[0], by_id["good/exif rotated.png"], atol=1e-3)
    with Image.open(corpus.root / "good" / "rgba.png") as im:
        alpha_dropped = np.asarray(im)[:, :, :3].copy()
    assert not np.allclose(rel_bundle.embed([alpha_dropped])[0], by_id["good/rgba.png"], atol=1e-3)
    with Image.open(corpus.root / "good" / "animated.gif") as im:
        im.seek(1)
        second = np.asarray(im.convert("RGB"))
    assert not np.allclose(rel_bundle.embed([second])[0], by_id["good/animated.gif"], atol=1e-3)


def test_embed_rerun_resumes_without_duplicates(embedded: Embedded, rel_bundle_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    shutil.copytree(embedded.out, out)
    again = run_cli(
        "embed",
        "--bundle",
        rel_bundle_dir,
        "--data",
        embedded.corpus.root,
        "--out",
        out,
        "--num-workers",
        "0",
        "--quiet",
    )
    assert again.rc == 0, again.err
    assert "embedded 0 images" in again.out
    rows, _, _ = read_shards(out)
    assert sorted(rows["id"]) == sorted(embedded.corpus.good)


def test_embed_fail_stops_with_one_line_naming_the_file(tmp_path: Path, rel_bundle_dir: Path) -> None:
    corpus = build_corpus(tmp_path / "images")
    out = tmp_path / "shards"
    # a dangling link is found before anything is decoded
    run = embed_cli(rel_bundle_dir, corpus.root, out, "--on-error", "fail")
    assert run.rc == 2
    assert "dangling link.png" in run.error_line and "broken symbolic link" in run.error_line
    assert not list(out.glob("part-*.parquet"))

    (corpus.root / "bad" / "dangling link.png").unlink()
    run = embed_cli(rel_bundle_dir, corpus.root, out, "--on-error", "fail")
    assert run.rc == 2
    line = run.error_line
    assert "bad/bomb 200 MP.png" in line and "decompression bomb" in line and "--on-error skip" in line
    assert not list(out.glob("part-*.parquet")) and not list(out.glob(".*tmp"))


# --------------------------------------------------------------------------------------------------
# the corpus through `deepfeat sync` into Milvus Lite


def test_sync_corpus_into_milvus_lite(embedded: Embedded, rel_bundle_dir: Path, tmp_path: Path) -> None:
    corpus, db, report_file = embedded.corpus, tmp_path / "corpus.db", tmp_path / "sync report.json"
    run = run_cli(
        "sync",
        corpus.root,
        "--bundle",
        rel_bundle_dir,
        "--collection",
        "corpus",
        "--uri",
        db,
        "--report",
        report_file,
        "--format",
        "json",
        "--no-progress",
    )
    assert run.rc == 0, run.err
    summary = json.loads(run.out)
    assert (summary["added"], summary["skipped"], summary["final_count"]) == (
        len(corpus.good),
        len(corpus.bad),
        len(corpus.good),
    )
    assert summary["skipped_ids"] == sorted(corpus.bad)
    report = json.loads(report_file.read_text())
    reasons = {s["id"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == set(corpus.bad)
    for rid, pattern in corpus.bad.items():
        assert re.search(pattern, reasons[rid]), f"{rid}: {reasons[rid]!r} does not say {pattern!r}"

    rows = milvus_rows(db, "corpus")
    assert set(rows) == set(corpus.good)
    shard_rows, shard_vectors, _ = read_shards(embedded.out)
    for rid, vector in zip(shard_rows["id"], shard_vectors, strict=True):
        row = rows[rid]
        np.testing.assert_allclose(np.asarray(row["vector"], dtype=np.float32), vector, atol=1e-5, err_msg=rid)
        assert row["pk"] == primary_key(rid) and re.fullmatch(r"[0-9a-f]{32}", str(row["pk"]))  # safe keys
        assert Path(str(row["path"])) == corpus.root / rid  # paths are data, exactly as on disk

    conn = connect(str(db))
    try:  # ids with quotes work as queries (the key is a hex digest, never the raw id)
        hits = search_ids(conn, "corpus", ['good/quote\'s "double".png', "it's \"quoted\" é/b 'c'.png"], top_k=3)
        assert all(len(h) == 3 for h in hits)
    finally:
        conn.release_lite()

    again = run_cli(
        "sync",
        corpus.root,
        "--bundle",
        rel_bundle_dir,
        "--collection",
        "corpus",
        "--uri",
        db,
        "--format",
        "json",
        "--no-progress",
    )
    assert again.rc == 0, again.err
    summary = json.loads(again.out)
    assert (summary["added"], summary["updated"], summary["deleted"], summary["unchanged"]) == (
        0,
        0,
        0,
        len(corpus.good),
    )
    assert summary["final_count"] == len(corpus.good)


def test_sync_on_error_fail_refuses_before_writing(tmp_path: Path, rel_bundle_dir: Path) -> None:
    corpus = build_corpus(tmp_path / "images")
    db = tmp_path / "fail.db"
    run = run_cli(
        "sync",
        corpus.root,
        "--bundle",
        rel_bundle_dir,
        "--collection",
        "c",
        "--uri",
        db,
        "--on-error",
        "fail",
        "--no-progress",
    )
    assert run.rc == 2
    assert "dangling link.png" in run.error_line and "Nothing was written" in run.error_line
    assert milvus_rows(db, "c") == {}
    (corpus.root / "bad" / "dangling link.png").unlink()
    run = run_cli(
        "sync",
        corpus.root,
        "--bundle",
        rel_bundle_dir,
        "--collection",
        "c",
        "--uri",
        db,
        "--on-error",
        "fail",
        "--no-progress",
        "--batch-size",
        "64",
    )
    assert run.rc == 2
    line = run.error_line
    assert "bad/bomb 200 MP.png" in line and "decompression bomb" in line and "re-run the sync" in line


# --------------------------------------------------------------------------------------------------
# manifests


def _manifest(tmp_path: Path, n: int = 4) -> tuple[Path, pd.DataFrame]:
    from support.reliability import _png_bytes, _rng_image

    rng = np.random.default_rng(5)
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    rows = []
    for i in range(n):
        (images / f"{i}.png").write_bytes(_png_bytes(_rng_image(rng)))
        rows.append({"id": f"r{i}", "path": f"images/{i}.png", "label": f"c{i % 2}", "split": "train"})
    return tmp_path / "data", pd.DataFrame(rows)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_label_column", r"missing required column\(s\): label"),
        ("no_path_column", r"missing required column\(s\): path or image"),
        ("duplicate_ids", r"1 id\(s\) occur more than once, e\.g\. \['r1'\]"),
        ("empty_split", r"unknown split value\(s\) \{'<empty>': 1\}"),
        ("unknown_split", r"unknown split value\(s\) \{'training': 4\}"),
        ("escaping_root", r"1 path\(s\) lead outside the data root .*'\.\./\.\./etc/passwd'"),
        ("missing_file", r"cannot be found.*1 missing, e\.g\. \[.*gone\.png'\]"),
        ("empty_table", r"empty \(0 rows\)"),
        ("empty_label", r"1 row\(s\) have no label, e\.g\. ids \['r2'\]"),
    ],
)
def test_bad_manifest_is_one_clear_line_and_exit_2(
    case: str, message: str, tmp_path: Path, rel_bundle_dir: Path
) -> None:
    root, df = _manifest(tmp_path)
    extra: list[str] = []
    if case == "no_label_column":
        df = df.drop(columns=["label"])
    elif case == "no_path_column":
        df = df.drop(columns=["path"])
    elif case == "duplicate_ids":
        df.loc[2, "id"] = "r1"
    elif case == "empty_split":
        df.loc[1, "split"] = ""
    elif case == "unknown_split":
        df["split"] = "training"
    elif case == "escaping_root":
        df.loc[3, "path"] = "../../etc/passwd"
        extra = ["--root", str(root)]
    elif case == "missing_file":
        df.loc[0, "path"] = "images/gone.png"
        extra = ["--on-error", "fail"]
    elif case == "empty_table":
        df = df.iloc[:0]
    elif case == "empty_label":
        df.loc[2, "label"] = ""
    manifest = root / "manifest.csv"
    df.to_csv(manifest, index=False)
    out = tmp_path / "shards"
    run = embed_cli(rel_bundle_dir, manifest, out, *extra)
    assert run.rc == 2, run.out + run.err
    assert re.search(message, run.error_line), run.error_line
    assert not out.exists() or not list(out.glob("part-*.parquet"))


def test_manifest_missing_file_with_skip_is_reported_and_the_rest_embedded(
    tmp_path: Path, rel_bundle_dir: Path
) -> None:
    root, df = _manifest(tmp_path)
    df.loc[0, "path"] = "images/gone.png"
    df.to_csv(root / "manifest.csv", index=False)
    run = embed_cli(rel_bundle_dir, root / "manifest.csv", tmp_path / "s")
    assert run.rc == 0, run.err
    report = json.loads((tmp_path / "s" / "_report.json").read_text())
    assert [(s["id"], bool(re.search("no such file", s["reason"]))) for s in report["skipped"]] == [("r0", True)]
    assert sorted(read_shards(tmp_path / "s")[0]["id"]) == ["r1", "r2", "r3"]


def test_single_image_class_is_warned_not_fatal(
    tmp_path: Path, rel_bundle_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, df = _manifest(tmp_path, n=5)
    df["label"] = ["1", "1", "2", "2", "lonely"]
    df.to_csv(root / "manifest.csv", index=False)
    run = embed_cli(rel_bundle_dir, root / "manifest.csv", tmp_path / "s")
    assert run.rc == 0, run.err
    assert re.search(r"1 of 3 class\(es\) in split 'train' have a single image, e\.g\. \['lonely'\]", caplog.text)
    assert sorted(read_shards(tmp_path / "s")[0]["id"]) == ["r0", "r1", "r2", "r3", "r4"]


def test_mixed_label_types_are_merged_as_text_and_warned(
    tmp_path: Path, rel_bundle: ModelBundle, caplog: pytest.LogCaptureFixture
) -> None:
    # CSV cells are read as text and Parquet cannot hold a mixed column: mixed types come from tables built
    # in code (or JSON, Hugging Face datasets), which go through the same validation
    from deepfeat.finetune.data.readers import read_records
    from deepfeat.finetune.inference.embed import embed_to_parquet

    root, df = _manifest(tmp_path, n=5)
    df["path"] = [str(root / p) for p in df["path"]]
    df["label"] = pd.Series([1, "1", 2.0, "2", np.int64(3)], dtype=object)  # 1 == "1", 2.0 == "2"
    records = read_records(df)
    assert "labels mix types ['int', 'str']" in caplog.text
    assert records["label"].tolist() == ["1", "1", "2", "2", "3"]
    embed_to_parquet(rel_bundle, records, tmp_path / "s", progress=False)
    assert sorted(read_shards(tmp_path / "s")[0]["label"]) == ["1", "1", "2", "2", "3"]


def test_single_image_classes_and_empty_splits_in_training_and_evaluation(caplog: pytest.LogCaptureFixture) -> None:
    from deepfeat.finetune.data.contract import check_retrievable, validate_records
    from deepfeat.finetune.training.datamodule import RetrievalDataModule
    from deepfeat.finetune.training.sampler import PKSampler

    img = np.zeros((8, 8, 3), np.uint8)
    df = validate_records(
        pd.DataFrame(
            {"id": list("abcde"), "image": [img] * 5, "label": ["x", "x", "y", "y", "z"], "split": ["test"] * 5}
        )
    )
    # one image of class z: it can only be a distractor; the others still score
    assert check_retrievable(df, "test") == 4
    lonely = validate_records(
        pd.DataFrame({"id": list("abc"), "image": [img] * 3, "label": ["x", "y", "z"], "split": "test"})
    )
    with pytest.raises(DataError, match="no query in split 'test' has a positive"):
        check_retrievable(lonely, "test")
    with pytest.raises(DataError, match=r"split 'val' has no records; splits present: \['test'\]"):
        check_retrievable(df, "val")
    sampler = PKSampler(df["label"].tolist(), p=2, k=2)
    assert sampler.skipped_classes == ["z"] and "fewer than 2 images" in caplog.text
    with pytest.raises(DataError, match="only 1 of 3 class"):
        PKSampler(["x", "x", "y", "z"], p=2, k=2)
    dm = RetrievalDataModule.from_records(df.assign(split="train"), val_fraction=0.0)
    with pytest.raises(DataError, match="there is no 'val' split"):
        dm.val_dataloader()


# --------------------------------------------------------------------------------------------------
# model / collection mismatches: refused before any write


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Bundles that differ from ``rel`` in one respect each.

    ``l2`` and ``pre48`` have the very same weights and name as ``rel`` (so the same bundle_id): only
    the metric, or only the preprocessing, tells them apart.
    """
    base = tmp_path_factory.mktemp("variants")
    return {
        "dim": make_bundle(base / "dim", seed=0, dim=DIM * 2, name="rel"),
        "l2": make_bundle(base / "l2", seed=0, name="rel", normalize=False),
        "pre48": make_bundle(base / "pre48", seed=0, name="rel", image_size=48),
        "other": make_bundle(base / "other", seed=7, name="rel-v2"),
    }


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory, rel_bundle_dir: Path) -> tuple[Path, Path]:
    """A Milvus Lite .db whose collection ``shop`` was filled by ``rel`` from a small image folder."""
    from support.reliability import _png_bytes, _rng_image

    base = tmp_path_factory.mktemp("filled")
    rng = np.random.default_rng(3)
    for c in ("a", "b"):
        (base / "images" / c).mkdir(parents=True)
        for i in range(3):
            (base / "images" / c / f"{i}.png").write_bytes(_png_bytes(_rng_image(rng)))
    run = run_cli(
        "sync",
        base / "images",
        "--bundle",
        rel_bundle_dir,
        "--collection",
        "shop",
        "--uri",
        base / "shop.db",
        "--no-progress",
    )
    assert run.rc == 0, run.err
    return base / "shop.db", base / "images"


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ("dim", r"embedding_dim: 8 != 16"),
        ("l2", r"metric: 'COSINE' != 'L2'"),
        ("pre48", r"preprocessing: .*\[32, 32\].* != .*\[48, 48\]"),
        ("other", r"bundle_id: 'rel@\w+' != 'rel-v2@\w+'"),
    ],
)
def test_sync_with_a_mismatched_bundle_is_refused_before_any_write(
    variant: str, message: str, variants: dict[str, Path], filled: tuple[Path, Path], tmp_path: Path
) -> None:
    db, images = filled
    before = milvus_rows(db, "shop")
    from support.reliability import _png_bytes, _rng_image

    (images / "a" / "new.png").write_bytes(_png_bytes(_rng_image(np.random.default_rng(9))))
    try:
        run = run_cli(
            "sync", images, "--bundle", variants[variant], "--collection", "shop", "--uri", db, "--no-progress"
        )
    finally:
        (images / "a" / "new.png").unlink()
    assert run.rc == 2
    line = run.error_line
    assert "syncing collection 'shop': the model bundle does not match" in line and re.search(message, line), line
    after = milvus_rows(db, "shop")
    assert set(after) == set(before) and len(after) == 6
    for rid in before:
        np.testing.assert_array_equal(after[rid]["vector"], before[rid]["vector"])


@pytest.mark.parametrize("variant", ["pre48", "l2", "other"])
def test_query_with_another_bundle_is_refused(
    variant: str, variants: dict[str, Path], filled: tuple[Path, Path]
) -> None:
    db, images = filled
    run = run_cli(
        "search", "--collection", "shop", "--uri", db, "--image", images / "a" / "0.png", "--bundle", variants[variant]
    )
    assert run.rc == 2 and "does not match" in run.error_line


def test_load_of_another_bundles_shards_is_refused(
    variants: dict[str, Path], filled: tuple[Path, Path], tmp_path: Path
) -> None:
    db, images = filled
    out = tmp_path / "shards"
    assert embed_cli(variants["other"], images, out).rc == 0
    run = run_cli("load", out, "--collection", "shop", "--uri", db, "--no-progress")
    assert run.rc == 2 and "does not match" in run.error_line
    assert len(milvus_rows(db, "shop")) == 6
    # and shards of one bundle never mix with another's in one --out folder
    run = embed_cli(variants["pre48"], images, out)
    assert run.rc == 2 and "holds shards from another model bundle" in run.error_line


def test_non_finite_embeddings_are_refused_before_writing(
    tmp_path: Path, filled: tuple[Path, Path], rel_bundle_dir: Path
) -> None:
    from deepfeat.finetune.models.bundle import export_bundle

    model = ModelBundle.load(rel_bundle_dir).model
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")  # a damaged model: every output row is NaN
    broken = export_bundle(model, tmp_path / "nan", name="nan", onnx=False, torchscript=False)
    _, images = filled
    run = embed_cli(broken, images, tmp_path / "s")
    assert run.rc == 2 and "non-finite embeddings" in run.error_line
    assert not list((tmp_path / "s").glob("part-*"))
    fresh = tmp_path / "nan.db"
    run = run_cli("sync", images, "--bundle", broken, "--collection", "nan", "--uri", fresh, "--no-progress")
    assert run.rc == 2 and "non-finite embeddings" in run.error_line
    assert milvus_rows(fresh, "nan") == {}


# --------------------------------------------------------------------------------------------------
# unsafe and foreign checkpoints


class _Payload:
    """Unpickling this object creates a marker file: what a malicious checkpoint would do (harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_pickled_code_in_checkpoints_bundles_and_weights_never_runs(tmp_path: Path, rel_bundle_dir: Path) -> None:
    from deepfeat.finetune.models.backbones import create_backbone

    marker = tmp_path / "PWNED"
    state = ModelBundle.load(rel_bundle_dir).model.state_dict()
    # the payload really would run under a plain torch.load
    torch.save({"payload": _Payload(tmp_path / "proof")}, tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)
    assert (tmp_path / "proof").exists()

    ckpt = tmp_path / "evil.ckpt"
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in state.items()},
            "hyper_parameters": {},
            "callbacks": _Payload(marker),
        },
        ckpt,
    )
    run = run_cli("export", "--ckpt", ckpt, "--out", tmp_path / "bundle", "--no-onnx")
    assert run.rc == 2 and "weights_only=True" in run.error_line and "evil.ckpt" in run.error_line

    bundle = tmp_path / "evil-bundle"
    shutil.copytree(rel_bundle_dir, bundle)
    torch.save({**state, "x": _Payload(marker)}, bundle / "model.pt")
    run = run_cli("embed", "--bundle", bundle, "--data", tmp_path, "--out", tmp_path / "s")
    assert run.rc == 2 and "cannot load" in run.error_line and "safely" in run.error_line

    torch.save({**state, "x": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ModelError, match="weights_only"):
        create_backbone("test_efficientnet", weights=str(tmp_path / "evil.pth"))
    assert not marker.exists(), "a pickled payload was executed"


def test_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    from deepfeat.finetune.training.callbacks import load_module_weights
    from deepfeat.finetune.training.module import MetricLearningModule

    source = MetricLearningModule(backbone="test_resnet", weights="none", image_size=32, embedding_dim=DIM)
    torch.save({"state_dict": source.state_dict(), "hyper_parameters": dict(source.hparams)}, tmp_path / "r.ckpt")
    target = MetricLearningModule(backbone="test_efficientnet", weights="none", image_size=32, embedding_dim=DIM)
    with pytest.raises(ModelError, match="another architecture or config"):
        load_module_weights(target, tmp_path / "r.ckpt")
    from deepfeat.finetune.models.backbones import create_backbone

    torch.save(source.model.backbone.model.state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ModelError, match="another architecture"):
        create_backbone("test_efficientnet", weights=str(tmp_path / "resnet.pth"))


_FIT_CONFIG = """
seed_everything: 0
trainer: {accelerator: cpu, devices: 1, max_epochs: 1, logger: false, enable_progress_bar: false,
          num_sanity_val_steps: 0, default_root_dir: RUN}
model: {backbone: test_efficientnet, weights: none, image_size: 32, embedding_dim: 8}
data: {source: DATA, val_fraction: 0.25, p: 2, k: 2, batches_per_epoch: 1, num_workers: 0}
"""


def test_resuming_training_from_a_pickled_checkpoint_is_refused(tmp_path: Path) -> None:
    from support.imagegen import make_image_folder

    marker = tmp_path / "PWNED"
    images = make_image_folder(tmp_path / "images", n_classes=2, per_class=4)
    config = tmp_path / "fit.yaml"
    config.write_text(_FIT_CONFIG.replace("RUN", str(tmp_path / "run")).replace("DATA", str(images)))
    torch.save({"state_dict": {}, "epoch": 0, "global_step": 0, "loops": _Payload(marker)}, tmp_path / "evil.ckpt")
    run = run_cli("fit", "--config", config, "--ckpt_path", tmp_path / "evil.ckpt")
    assert run.rc == 2
    assert re.search(
        r"refused to load the checkpoint: it holds a pickled '(io|builtins)\.open'.*weights_only=True", run.error_line
    ), run.error_line
    assert not marker.exists(), "a pickled payload was executed"
