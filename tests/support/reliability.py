"""Shared helpers of the reliability tests (issue 7): a corpus of bad and awkward image files, tiny bundles.

Every file is generated in ``tmp_path``. The good files come with the pixels a correct decoder must
produce, computed here from the data they were made from (not by deepfeat's decoder), so a test can
compare each stored vector with the bundle's embedding of the correctly decoded image.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepfeat.finetune.models.bundle import ModelBundle, export_bundle

DIM = 8
SIZE = 32


def make_bundle(
    path: Path,
    *,
    seed: int = 0,
    dim: int = DIM,
    name: str | None = None,
    image_size: int = SIZE,
    backbone: str = "test_efficientnet",
    normalize: bool = True,
) -> Path:
    """A tiny real bundle (timm ``test_efficientnet``, random weights from ``seed``)."""
    import torch

    from deepfeat.finetune.models.model import build_embedding_model

    torch.manual_seed(seed)
    model = build_embedding_model(backbone, weights="none", image_size=image_size, embedding_dim=dim)
    model.normalize = normalize
    return export_bundle(model, path, name=name, onnx=False, torchscript=False)


@pytest.fixture(scope="session")
def rel_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle the reliability tests embed with (shared by the session)."""
    return make_bundle(tmp_path_factory.mktemp("rel_bundles") / "rel", seed=0, name="rel")


@pytest.fixture(scope="session")
def rel_bundle(rel_bundle_dir: Path) -> ModelBundle:
    """The loaded bundle."""
    return ModelBundle.load(rel_bundle_dir)


# --------------------------------------------------------------------------------------------------
# the corpus


@dataclass
class Corpus:
    """An image folder (``root/<class>/<file>``) of good and bad files.

    Attributes:
        good: record id -> the (H, W, 3) uint8 pixels a correct decoder gives (``None``: only check
            that the vector is finite and equals the embedding of deepfeat's own decode).
        bad: record id -> a regular expression the skip reason must match.
    """

    root: Path
    good: dict[str, np.ndarray | None] = field(default_factory=dict)
    bad: dict[str, str] = field(default_factory=dict)


def _rng_image(rng: np.random.Generator, h: int = SIZE, w: int = SIZE) -> np.ndarray:
    """Smooth random colour blobs plus noise: distinct per image, survives JPEG well enough."""
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR), dtype=np.int16)
    return np.clip(big + rng.integers(-10, 11, big.shape), 0, 255).astype(np.uint8)


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _huge_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of ``width`` x ``height`` all-black pixels, a few kB on disk (a decompression bomb)."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    raw = zlib.compress(row * height, 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _tiff_unknown_compression(pixels: np.ndarray) -> bytes:
    """A TIFF that claims WebP compression (50001), which Pillow identifies but this libtiff cannot decode."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="TIFF")
    data = bytearray(buf.getvalue())
    order = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack(order + "I", data[4:8])[0]
    (count,) = struct.unpack(order + "H", data[ifd : ifd + 2])
    for i in range(count):
        entry = ifd + 2 + 12 * i
        tag, kind = struct.unpack(order + "HH", data[entry : entry + 4])
        if tag == 259:  # Compression
            assert kind == 3  # SHORT
            data[entry + 8 : entry + 10] = struct.pack(order + "H", 50001)  # WebP: libtiff here lacks it
            return bytes(data)
    raise AssertionError("no Compression tag written")


def _dicom_bytes(corrupt: bool) -> bytes:
    """pydicom's CT_small.dcm; ``corrupt`` cuts the pixel data in half (the header says more)."""
    from pydicom.data import get_testdata_file

    data = Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()
    return data[: len(data) - len(data) // 4] if corrupt else data


def build_corpus(root: Path, *, seed: int = 0) -> Corpus:
    """Write the corpus of issue 7 under ``root`` and return what each file must give.

    Classes: ``good`` (awkward but valid files), ``bad`` (files that must be skipped with a reason),
    ``it's "quoted" é`` (a class folder whose name has quotes and non-ASCII characters).
    """
    rng = np.random.default_rng(seed)
    corpus = Corpus(root)
    good, bad, odd = root / "good", root / "bad", root / 'it\'s "quoted" é'
    for d in (good, bad, odd):
        d.mkdir(parents=True)

    def add_good(folder: Path, name: str, data: bytes, pixels: np.ndarray | None) -> None:
        (folder / name).write_bytes(data)
        corpus.good[f"{folder.name}/{name}"] = pixels

    def add_bad(name: str, data: bytes | None, reason: str) -> None:
        if data is not None:
            (bad / name).write_bytes(data)
        corpus.bad[f"bad/{name}"] = reason

    # --- good: plain RGB, awkward names
    for name in ("plain.png", "with space.png", 'quote\'s "double".png', "日本語 ünï.png", "tab\tand;semi,colon.png"):
        pixels = _rng_image(rng)
        add_good(good, name, _png_bytes(pixels), pixels)
    for name in ("a.png", "b 'c'.png"):
        pixels = _rng_image(rng)
        add_good(odd, name, _png_bytes(pixels), pixels)

    # --- good: 16-bit grayscale PNG -> full-range scaling round(v / 257)
    a16 = (rng.integers(0, 256, (SIZE, SIZE)).astype(np.uint16) * 257 + rng.integers(0, 257, (SIZE, SIZE))).astype(
        np.uint16
    )
    buf = io.BytesIO()
    Image.fromarray(a16).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    g8 = ((a16.astype(np.uint32) + 128) // 257).astype(np.uint8)
    add_good(good, "sixteen bit.png", buf.getvalue(), np.repeat(g8[:, :, None], 3, axis=2))

    # --- good: 8-bit grayscale
    gray = _rng_image(rng)[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buf, format="PNG")
    add_good(good, "gray.png", buf.getvalue(), np.repeat(gray[:, :, None], 3, axis=2))

    # --- good: palette PNG (no transparency)
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (SIZE, SIZE), dtype=np.uint8)
    pal = Image.fromarray(index, mode="P")
    pal.putpalette(palette.reshape(-1).tolist())
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    add_good(good, "palette.png", buf.getvalue(), palette[index])

    # --- good: RGBA PNG -> composited on white
    rgb = _rng_image(rng)
    alpha = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    alpha[:8] = 0  # fully transparent rows carry black that must not show
    rgb[:8] = 0
    buf = io.BytesIO()
    Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(buf, format="PNG")
    a = alpha.astype(np.uint32)[:, :, None]
    composite = ((rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
    add_good(good, "rgba.png", buf.getvalue(), composite)

    # --- good: CMYK JPEG (what print workflows export); the reference decode is Pillow's CMYK -> RGB
    cmyk = Image.fromarray(_rng_image(rng)).convert("CMYK")
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG", quality=95)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert im.mode == "CMYK"
        reference = np.asarray(im.convert("RGB"))
    add_good(good, "cmyk.jpg", buf.getvalue(), reference)

    # --- good: EXIF orientation 6 (stored sideways; shown rotated 90 degrees clockwise), lossless PNG
    stored = _rng_image(rng, 24, 40)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="PNG", exif=exif.tobytes())
    add_good(good, "exif rotated.png", buf.getvalue(), np.ascontiguousarray(np.rot90(stored, k=-1)))

    # --- good: animated GIF -> first frame (frames drawn from one exact palette, so GIF is lossless)
    gif_palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)
    frames_idx = [rng.integers(0, 4, (SIZE, SIZE), dtype=np.uint8) for _ in range(3)]
    frames = []
    for idx in frames_idx:
        f = Image.fromarray(idx, mode="P")
        f.putpalette(gif_palette.reshape(-1).tolist() + [0] * (768 - 12))
        frames.append(f)
    buf = io.BytesIO()
    frames[0].save(
        buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0, optimize=False, disposal=1
    )
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert getattr(im, "n_frames", 1) == 3
    add_good(good, "animated.gif", buf.getvalue(), gif_palette[frames_idx[0]])

    # --- good: a real DICOM (pydicom's test CT); pixels checked against deepfeat's own decode only
    add_good(good, "ct scan.dcm", _dicom_bytes(corrupt=False), None)

    # --- good: a symbolic link to a real file
    target = root.parent / f"{root.name}-outside-target.png"
    pixels = _rng_image(rng)
    target.write_bytes(_png_bytes(pixels))
    os.symlink(target, good / "link to file.png")
    corpus.good["good/link to file.png"] = pixels

    # --- bad
    add_bad("zero bytes.png", b"", r"empty \(0 bytes\)")
    jpeg = _jpeg_bytes(_rng_image(rng, 64, 64))
    add_bad("truncated.jpg", jpeg[: len(jpeg) // 2], r"the file is truncated")
    png = _png_bytes(_rng_image(rng, 64, 64))
    add_bad("truncated.png", png[: len(png) // 2], r"the file is truncated")
    add_bad("not an image.jpg", b"name,price\nshoe,12\n" * 20, r"not an image")
    add_bad(
        "unsupported codec.tif",
        _tiff_unknown_compression(_rng_image(rng)),
        r"TIFF file with compression 'webp', which this Pillow build may not support",
    )
    add_bad("bomb.png", _huge_png(12_000, 10_000), r"decompression bomb guard: 12000 x 10000")
    add_bad(
        "bomb 200 MP.png", _huge_png(20_000, 10_000), r"decompression bomb refused by Pillow"
    )  # above Pillow's own limit
    add_bad("corrupt.dcm", _dicom_bytes(corrupt=True), r"cannot decode the DICOM pixel data")
    add_bad("html page.png", b"<!doctype html><html><body>404 Not Found</body></html>", r"not an image")
    os.symlink(root.parent / "deleted-long-ago.png", bad / "dangling link.png")
    corpus.bad["bad/dangling link.png"] = r"broken symbolic link"
    return corpus
