"""Decoding and preprocessing on the model's device (``decode="device"``), checked on the CPU.

The code path is the one a GPU runs (``torchvision.io.decode_jpeg(device=...)``, the resize as matrix
products, the CPU fallback for what the device decoder cannot take); here the device is the CPU, so
CI exercises it. It must agree with the workers' Pillow + OpenCV pipeline to within 8-bit rounding,
skip the same bad files for the same reasons, and never turn a bad file into a vector.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from support.reliability import build_corpus

from deepfeat.finetune.data.dataset import SkipReport
from deepfeat.finetune.data.images import load_image
from deepfeat.finetune.data.readers import read_records
from deepfeat.finetune.data.transforms import build_transforms
from deepfeat.finetune.errors import DataError, ImageDecodeError
from deepfeat.finetune.inference.device_decode import DevicePreprocess, jpeg_for_device, orient
from deepfeat.finetune.inference.embed import embed_to_parquet, iter_embeddings, read_shards
from deepfeat.finetune.models.backbones import Preprocessing
from deepfeat.finetune.models.bundle import ModelBundle

CPU = torch.device("cpu")


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random image (blocks upsampled): resampling differences show on it, unlike on flat fills."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)).copy()


def _jpeg(pixels: np.ndarray, **save: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


@pytest.mark.parametrize(
    "pre",
    [
        Preprocessing(
            input_size=(64, 64), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic", resize_mode="squash"
        ),
        Preprocessing(input_size=(64, 64), interpolation="bilinear", resize_mode="shorter_side_crop"),
        Preprocessing(input_size=(48, 40), interpolation="bicubic", resize_mode="shorter_side_crop"),
        Preprocessing(input_size=(32, 32), interpolation="nearest", resize_mode="squash"),
    ],
    ids=["squash-bicubic", "crop-bilinear", "crop-bicubic-nonsquare", "squash-nearest"],
)
@pytest.mark.parametrize("size", [(64, 64), (90, 70), (50, 80), (28, 28), (300, 200), (33, 257)])
def test_device_preprocessing_matches_the_worker_pipeline_within_rounding(
    pre: Preprocessing, size: tuple[int, int]
) -> None:
    pixels = _photo(*size, seed=size[0] * 1000 + size[1])
    expected = build_transforms(pre, preset="none", train=False)(image=pixels)["image"]
    got = DevicePreprocess(pre, CPU)([torch.from_numpy(pixels).permute(2, 0, 1).contiguous()], channels_last=False)[0]
    assert got.shape == expected.shape
    levels = (got - expected).abs() * torch.tensor(pre.std).view(3, 1, 1) * 255
    # OpenCV works in fixed point for 8-bit images: one grey level apart at most, and rarely
    assert float(levels.max()) <= 1.0 + 1e-3
    assert float(levels.mean()) < 0.2


def test_device_preprocessing_batches_mixed_sizes_in_input_order() -> None:
    pre = Preprocessing(input_size=(32, 32), interpolation="bilinear", resize_mode="shorter_side_crop")
    images = [_photo(40, 60, seed=1), _photo(32, 32, seed=2), _photo(40, 60, seed=3)]
    batch = DevicePreprocess(pre, CPU)([torch.from_numpy(p).permute(2, 0, 1).contiguous() for p in images])
    assert batch.shape == (3, 3, 32, 32) and batch.is_contiguous(memory_format=torch.channels_last)
    cpu = build_transforms(pre, preset="none", train=False)
    for row, pixels in zip(batch, images, strict=True):
        assert torch.allclose(row, cpu(image=pixels)["image"], atol=2.5 / 255 / 0.225)


def test_jpeg_for_device_takes_only_complete_rgb_or_gray_jpegs_within_the_pixel_limit() -> None:
    rgb = _photo(40, 30)
    good = _jpeg(rgb)
    assert jpeg_for_device(good, max_pixels=None) == 1
    assert jpeg_for_device(_jpeg(rgb[..., 0]), max_pixels=None) == 1  # grayscale
    assert jpeg_for_device(good + b"\x00" * 16, max_pixels=None) == 1  # zero padding after the end marker
    exif = Image.Exif()
    exif[0x0112] = 8
    assert jpeg_for_device(_jpeg(rgb, exif=exif.tobytes()), max_pixels=None) == 8
    assert jpeg_for_device(good[: len(good) // 2], max_pixels=None) is None  # truncated: the CPU path refuses it
    assert jpeg_for_device(good, max_pixels=40 * 30 - 1) is None  # the CPU path raises the clear size error
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, format="JPEG")
    assert jpeg_for_device(buf.getvalue(), max_pixels=None) is None
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    assert jpeg_for_device(png.getvalue(), max_pixels=None) is None
    assert jpeg_for_device(b"\xff\xd8\xff" + b"\x00" * 64 + b"\xff\xd9", max_pixels=None) is None


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_turns_images_upright_like_pillow_exif_transpose(orientation: int) -> None:
    from PIL import ImageOps

    pixels = _photo(24, 40, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    with Image.open(io.BytesIO(_jpeg(pixels, exif=exif.tobytes()))) as im:
        want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    from torchvision.io import decode_jpeg

    raw = decode_jpeg(torch.frombuffer(bytearray(_jpeg(pixels)), dtype=torch.uint8))  # no orientation applied
    got = orient(raw, orientation).permute(1, 2, 0).numpy()
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_device_decode_applies_exif_orientation_like_pillow(tmp_path: Path, rel_bundle: ModelBundle) -> None:
    pixels = _photo(24, 40, seed=5)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    path.write_bytes(_jpeg(pixels, exif=exif.tobytes()))
    assert load_image(path).shape == (40, 24, 3)
    records = pd.DataFrame({"id": ["r"], "path": [str(path)], "label": ["x"]})
    ((_, got),) = list(iter_embeddings(rel_bundle, records, decode="device", device="cpu"))
    ((_, want),) = list(iter_embeddings(rel_bundle, records, decode="cpu", device="cpu"))
    assert float((got * want).sum()) > 0.999


def test_device_decode_on_the_reliability_corpus_skips_the_same_files_and_agrees_on_the_rest(
    tmp_path: Path, rel_bundle: ModelBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    import deepfeat.finetune.inference.device_decode as device_decode

    on_device: list[int] = []
    real = device_decode.decode_on_device

    def counting(
        encoded: list[torch.Tensor], device: torch.device, orientations: list[int] | None = None
    ) -> list[torch.Tensor | None]:
        out = real(encoded, device, orientations)
        on_device.extend(1 for image in out if image is not None)
        return out

    monkeypatch.setattr(device_decode, "decode_on_device", counting)
    corpus = build_corpus(tmp_path / "images")
    # plus real JPEG photos, which take the device path (the corpus is mostly other formats and faults)
    for i in range(6):
        (corpus.root / "good" / f"photo-{i}.jpg").write_bytes(_jpeg(_photo(48 + 8 * i, 64, seed=i)))
    records = read_records(corpus.root, check_files=False)
    runs = {}
    for decode in ("cpu", "device"):
        report = SkipReport()
        batches = list(
            iter_embeddings(
                rel_bundle, records, batch_size=4, num_workers=2, report=report, decode=decode, device="cpu"
            )
        )
        rows = pd.concat([r for r, _ in batches])
        runs[decode] = (rows, np.concatenate([v for _, v in batches]), {s["id"]: s["reason"] for s in report.skipped})
    (rows_c, vec_c, skip_c), (rows_d, vec_d, skip_d) = runs["cpu"], runs["device"]
    n_jpeg = sum(1 for p in records["path"] if str(p).lower().endswith((".jpg", ".jpeg")) and p not in skip_c)
    assert len(on_device) >= 6 and len(on_device) <= n_jpeg  # the photos, at least, were decoded "on the device"
    assert skip_d == skip_c and set(skip_c) >= set(corpus.bad)
    assert list(rows_d["id"]) == list(rows_c["id"])
    assert list(rows_d["content_hash"]) == list(rows_c["content_hash"])  # the file bytes' hash either way
    assert np.isfinite(vec_d).all()
    cos = (vec_d * vec_c).sum(axis=1)  # the test bundle normalises
    assert cos.min() > 0.999, dict(zip(rows_c["id"], cos.round(5), strict=True))


def test_device_decode_fail_mode_names_the_bad_jpeg(tmp_path: Path, rel_bundle: ModelBundle) -> None:
    good = tmp_path / "good.jpg"
    good.write_bytes(_jpeg(_photo(32, 32)))
    # a complete JPEG whose Huffman table is garbage: the marker walk sees that the table runs past its
    # segment, so it never reaches the device decoder; the CPU path names the file and the damage
    data = bytearray(_jpeg(_photo(32, 32, seed=9)))
    start = data.index(b"\xff\xc4") + 5
    data[start : start + 16] = b"\xff" * 16
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(bytes(data))
    assert jpeg_for_device(bytes(data), max_pixels=None) is None
    records = pd.DataFrame({"id": ["good", "bad"], "path": [str(good), str(bad)], "label": ["x", "x"]})
    with pytest.raises(ImageDecodeError, match=r"bad\.jpg.*damaged JPEG: a Huffman table is cut short"):
        list(iter_embeddings(rel_bundle, records, decode="device", device="cpu", on_error="fail"))
    result = embed_to_parquet(rel_bundle, records, tmp_path / "out", decode="device", device="cpu", progress=False)
    rows, vectors, _ = read_shards(tmp_path / "out")
    assert result.n_skipped == 1 and list(rows["id"]) == ["good"] and np.isfinite(vectors).all()


def test_decode_choice_is_checked(rel_bundle: ModelBundle, tmp_path: Path) -> None:
    records = pd.DataFrame({"id": ["a"], "path": [str(tmp_path / "a.jpg")], "label": ["x"]})
    with pytest.raises(DataError, match="decode must be one of"):
        list(iter_embeddings(rel_bundle, records, decode="gpu"))  # type: ignore[arg-type]


def test_run_ahead_keeps_order_raises_the_workers_error_and_stops_when_closed() -> None:
    import threading

    from deepfeat.finetune.inference.embed import _run_ahead

    assert list(_run_ahead(iter(range(20)), lambda b: b * 2, threaded=True)) == [2 * i for i in range(20)]

    def boom(b: int) -> int:
        if b == 3:
            raise ImageDecodeError("x.jpg", "broken")
        return b

    got: list[int] = []
    with pytest.raises(ImageDecodeError, match="broken"):
        for item in _run_ahead(iter(range(10)), boom, threaded=True):
            got.append(item)
    assert got == [0, 1, 2]
    seen: list[int] = []
    def stage(b: int) -> int:
        seen.append(b)
        return b

    gen = _run_ahead(iter(range(1000)), stage, threaded=True, depth=2)
    assert next(gen) == 0
    gen.close()  # the thread stops instead of staging all 1000
    assert not any(t.name == "deepfeat-embed-stage" for t in threading.enumerate())
    assert len(seen) < 10


@pytest.mark.parametrize(
    "save",
    [
        {},
        {"progressive": True},
        {"subsampling": 0},
        {"subsampling": 2},
        {"optimize": True},
    ],
    ids=["baseline", "progressive", "444", "420", "optimized"],
)
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_jpeg_header_walk_agrees_with_pillow(save: dict[str, object], orientation: int) -> None:
    pixels = _photo(37, 53, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _jpeg(pixels, exif=exif.tobytes(), **save)
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (53, 37) and im.getexif().get(0x0112) == orientation
    assert jpeg_for_device(data, max_pixels=None) == orientation
    assert jpeg_for_device(data, max_pixels=53 * 37) == orientation
    assert jpeg_for_device(data, max_pixels=53 * 37 - 1) is None


def test_cli_embed_decodes_on_the_device_and_refuses_a_missing_gpu(
    tmp_path: Path, rel_bundle_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deepfeat.recipes.cli import main

    folder = tmp_path / "images" / "x"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(_jpeg(_photo(40, 48, seed=i)))
    common = ["embed", "--bundle", str(rel_bundle_dir), "--data", str(tmp_path / "images"), "--num-workers", "0"]
    out = tmp_path / "shards"
    assert main([*common, "--out", str(out), "--quiet", "--decode", "device", "--device", "cpu"]) == 0
    rows, vectors, _ = read_shards(out)
    assert len(rows) == 3 and np.isfinite(vectors).all()
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert main([*common, "--out", str(tmp_path / "gpu"), "--quiet", "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "no CUDA device is available" in err and "--device cpu" in err
        assert not (tmp_path / "gpu").exists()


def test_auto_num_workers_leaves_a_small_cpu_to_the_model_and_feeds_a_gpu() -> None:
    from deepfeat.finetune.inference.embed import auto_num_workers

    assert auto_num_workers("cpu", cores=2) == 0  # measured: a worker slows the model's own threads
    assert auto_num_workers("cpu", cores=8) == 2
    assert auto_num_workers("cpu", cores=64) == 4
    assert auto_num_workers("cuda", cores=16) == 8
    assert auto_num_workers("cuda", cores=2) == 1


def test_cli_refuses_a_negative_worker_count(capsys: pytest.CaptureFixture[str]) -> None:
    from deepfeat.recipes.cli import main

    with pytest.raises(SystemExit):
        main(["embed", "--bundle", "b", "--data", "d", "--out", "o", "--num-workers", "-1"])
    assert "cannot be negative" in capsys.readouterr().err


def test_device_path_refuses_a_jpeg_cut_short_with_its_end_marker(tmp_path: Path, rel_bundle: ModelBundle) -> None:
    good, grey = tmp_path / "good.jpg", tmp_path / "grey.jpg"
    good.write_bytes(_jpeg(_photo(64, 64)))
    half_grey = _photo(64, 64, seed=3)
    half_grey[32:] = 128  # complete, but ends in the zero-fill grey: checked on the CPU and kept
    grey.write_bytes(_jpeg(half_grey))
    data = _jpeg(_photo(64, 64, seed=5))
    cut = data[: len(data) // 2] + b"\xff\xd9"
    assert jpeg_for_device(cut, max_pixels=None) == 1  # its markers look complete: it reaches the device
    (tmp_path / "cut.jpg").write_bytes(cut)
    records = pd.DataFrame({"id": ["good", "cut", "grey"], "path": [str(good), str(tmp_path / "cut.jpg"), str(grey)],
                            "label": "x"})
    with pytest.raises(ImageDecodeError, match=r"cut\.jpg.*damaged JPEG: its image data stops after"):
        list(iter_embeddings(rel_bundle, records, decode="device", device="cpu", on_error="fail"))
    result = embed_to_parquet(rel_bundle, records, tmp_path / "out", decode="device", device="cpu", progress=False)
    rows, vectors, _ = read_shards(tmp_path / "out")
    assert result.n_skipped == 1 and sorted(rows["id"]) == ["good", "grey"] and np.isfinite(vectors).all()
    kept = records.iloc[[0, 2]].reset_index(drop=True)
    ((_, cpu),) = list(iter_embeddings(rel_bundle, kept, decode="cpu", device="cpu"))
    ((_, dev),) = list(iter_embeddings(rel_bundle, kept, decode="device", device="cpu"))
    assert (np.sum(cpu * dev, axis=1) > 0.99).all()  # the grey one took the CPU fallback: the CPU path's pixels
    # a restart-interval JPEG cut short is already caught from its markers, before any decoder
    import cv2

    rst = cv2.imencode(".jpg", _photo(64, 64), [cv2.IMWRITE_JPEG_RST_INTERVAL, 1])[1].tobytes()
    assert jpeg_for_device(rst, max_pixels=None) == 1
    assert jpeg_for_device(rst[: len(rst) // 2] + b"\xff\xd9", max_pixels=None) is None
