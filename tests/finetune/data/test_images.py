"""deepfeat.finetune.data.images: every decoder path on real files written to tmp_path."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from deepfeat.finetune.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    content_hash,
    load_image,
)
from deepfeat.finetune.errors import ImageDecodeError


def _png(array: np.ndarray, path: Path, **kwargs: object) -> Path:
    Image.fromarray(array).save(path, format="PNG", **kwargs)
    return path


def _rgb(height: int = 12, width: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _mode(path: Path) -> str:
    with Image.open(path) as image:
        return image.mode


def _local_testdata(name: str) -> str:
    """A file bundled with pydicom (no download is attempted for these)."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not bundled with this pydicom version")
    return str(path)


# --------------------------------------------------------------------------------------------------
# ordinary files


def test_rgb_png_is_returned_exactly(tmp_path: Path) -> None:
    pixels = _rgb()
    out = load_image(_png(pixels, tmp_path / "a.png"))
    assert out.dtype == np.uint8 and out.shape == (12, 20, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, pixels)


def test_path_as_str_and_bytes_give_the_same_pixels(tmp_path: Path) -> None:
    path = _png(_rgb(), tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(str(path)), load_image(path.read_bytes()))


def test_grayscale_is_replicated_to_three_channels(tmp_path: Path) -> None:
    gray = np.arange(0, 240, dtype=np.uint8).reshape(12, 20)
    out = load_image(_png(gray, tmp_path / "g.png"))
    assert out.shape == (12, 20, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)


def test_sixteen_bit_png_is_scaled_over_the_full_range(tmp_path: Path) -> None:
    values = np.array([[0, 257, 257 * 100, 65535]], dtype=np.uint16)
    path = _png(values, tmp_path / "deep.png")
    assert _mode(path).startswith("I;16")
    out = load_image(path)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 100, 255])
    assert (out[..., 0] == out[..., 2]).all()


def test_palette_png_gives_the_palette_colours(tmp_path: Path) -> None:
    pixels = np.zeros((4, 4, 3), dtype=np.uint8)
    pixels[:2] = (255, 0, 0)
    pixels[2:] = (0, 0, 255)
    palette_image = Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE, colors=2)
    palette_image.save(tmp_path / "p.png")
    assert _mode(tmp_path / "p.png") == "P"
    np.testing.assert_array_equal(load_image(tmp_path / "p.png"), pixels)


def test_palette_transparency_is_composited_on_white(tmp_path: Path) -> None:
    image = Image.new("P", (4, 2))
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.putdata([0, 1, 0, 1, 0, 1, 0, 1])
    image.save(tmp_path / "t.png", transparency=0)
    out = load_image(tmp_path / "t.png")
    np.testing.assert_array_equal(out[0, 0], (255, 255, 255))
    np.testing.assert_array_equal(out[0, 1], (10, 200, 30))


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, :, :3] = (0, 0, 0)  # black under the alpha, as many exporters leave it
    rgba[0, :, 3] = (0, 255, 128)
    out = load_image(_png(rgba, tmp_path / "a.png"))
    np.testing.assert_array_equal(out[0, 0], (255, 255, 255))
    np.testing.assert_array_equal(out[0, 1], (0, 0, 0))
    assert np.abs(out[0, 2].astype(int) - 127).max() <= 1


def test_la_image_is_gray_on_white(tmp_path: Path) -> None:
    la = Image.fromarray(np.array([[[50, 255], [50, 0]]], dtype=np.uint8), mode="LA")
    la.save(tmp_path / "la.png")
    out = load_image(tmp_path / "la.png")
    np.testing.assert_array_equal(out[0, 0], (50, 50, 50))
    np.testing.assert_array_equal(out[0, 1], (255, 255, 255))


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan ink
    cmyk.save(tmp_path / "c.jpg", quality=100)
    assert _mode(tmp_path / "c.jpg") == "CMYK"
    out = load_image(tmp_path / "c.jpg")
    assert out.shape == (16, 16, 3)
    red, green, blue = out.reshape(-1, 3).mean(axis=0)
    assert red < 20 and green > 235 and blue > 235


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = np.zeros((20, 40, 3), dtype=np.uint8)  # 20 high, 40 wide as stored
    stored[:4, :4] = (255, 0, 0)  # mark the stored top-left corner
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=100)
    out = load_image(tmp_path / "rot.jpg")
    assert out.shape == (40, 20, 3)  # upright: portrait
    assert out[1, -2, 0] > 200 and out[1, -2, 1] < 60  # the corner moved to the top-right
    assert out[1, 1, 0] < 60


def test_animated_gif_gives_the_first_frame(tmp_path: Path) -> None:
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    blue = Image.new("RGB", (8, 8), (0, 0, 255))
    red.save(tmp_path / "anim.gif", save_all=True, append_images=[blue], duration=100, loop=0)
    with Image.open(tmp_path / "anim.gif") as gif:
        assert getattr(gif, "n_frames", 1) == 2
    out = load_image(tmp_path / "anim.gif")
    np.testing.assert_array_equal(out.reshape(-1, 3).mean(axis=0), (255, 0, 0))


# --------------------------------------------------------------------------------------------------
# broken files


def test_zero_byte_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty"):
        load_image(tmp_path / "empty.jpg")
    with pytest.raises(ImageDecodeError, match="empty"):
        load_image(b"")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_an_error_not_a_grey_image(tmp_path: Path, fmt: str) -> None:
    buffer = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buffer, format=fmt)
    data = buffer.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageDecodeError, match="truncated") as info:
        load_image(path)
    assert info.value.source == str(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_garbage_is_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("these are not pixels\n")
    with pytest.raises(ImageDecodeError, match="not an image"):
        load_image(tmp_path / "notes.png")


def test_unsupported_format_is_an_error(tmp_path: Path) -> None:
    svg = '<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"><rect width="4" height="4"/></svg>'
    (tmp_path / "vector.svg").write_text(svg)
    with pytest.raises(ImageDecodeError, match="format Pillow cannot read"):
        load_image(tmp_path / "vector.svg")


def test_decompression_bomb_guard_uses_max_pixels(tmp_path: Path) -> None:
    path = _png(_rgb(64, 64), tmp_path / "big.png")
    with pytest.raises(ImageDecodeError, match="max_pixels=1000"):
        load_image(path, max_pixels=1000)
    assert load_image(path, max_pixels=64 * 64).shape == (64, 64, 3)
    assert load_image(path, max_pixels=None).shape == (64, 64, 3)


def _png_with_claimed_size(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose header claims another size (a classic bomb: tiny file, huge canvas)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8 + 8  # signature, then length + "IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def test_huge_dimensions_are_refused_before_decoding(tmp_path: Path) -> None:
    (tmp_path / "bomb.png").write_bytes(_png_with_claimed_size(10_000, 10_000))  # 1e8 > default limit
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        load_image(tmp_path / "bomb.png")
    (tmp_path / "bomb2.png").write_bytes(_png_with_claimed_size(50_000, 50_000))  # Pillow's own limit
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        load_image(tmp_path / "bomb2.png", max_pixels=None)
    assert DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS


def test_broken_symlink_says_so(tmp_path: Path) -> None:
    link = tmp_path / "link.png"
    os.symlink(tmp_path / "gone.png", link)
    with pytest.raises(ImageDecodeError, match="broken symbolic link"):
        load_image(link)
    with pytest.raises(ImageDecodeError, match="broken symbolic link"):
        content_hash(link)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageDecodeError, match="directory"):
        load_image(tmp_path)


def test_working_symlink_is_read(tmp_path: Path) -> None:
    pixels = _rgb()
    target = _png(pixels, tmp_path / "real.png")
    os.symlink(target, tmp_path / "link.png")
    np.testing.assert_array_equal(load_image(tmp_path / "link.png"), pixels)


# --------------------------------------------------------------------------------------------------
# arrays


def test_array_layouts() -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for array in (gray, gray[:, :, None]):
        out = load_image(array)
        assert out.shape == (3, 4, 3)
        np.testing.assert_array_equal(out[:, :, 1], gray)
    rgb = _rgb(3, 4)
    out = load_image(rgb)
    np.testing.assert_array_equal(out, rgb)
    assert not np.shares_memory(out, rgb)
    rgba = np.concatenate([rgb, np.zeros((3, 4, 1), dtype=np.uint8)], axis=2)
    assert (load_image(rgba) == 255).all()
    np.testing.assert_array_equal(load_image(np.full((2, 2), 65535, dtype=np.uint16)), 255)


def test_bad_arrays_are_refused_with_a_hint() -> None:
    with pytest.raises(ImageDecodeError, match="uint8 or uint16"):
        load_image(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ImageDecodeError, match="channels-first"):
        load_image(np.zeros((3, 8, 8), dtype=np.uint8))
    with pytest.raises(ImageDecodeError, match="empty"):
        load_image(np.zeros((0, 4), dtype=np.uint8))
    with pytest.raises(ImageDecodeError, match="unsupported source type"):
        load_image(12345)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# DICOM


def _write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    signed: bool = False,
    **attributes: object,
) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    for name, value in attributes.items():
        setattr(ds, name, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_ct_small_min_max_after_rescale() -> None:
    path = _local_testdata("CT_small.dcm")
    out = load_image(path)
    assert out.shape == (128, 128, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert out.min() == 0 and out.max() == 255  # no window in the file: min-max stretch
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.rint((hu - hu.min()) / (hu.max() - hu.min()) * 255)
    np.testing.assert_array_equal(out[..., 0], expected)


def test_dicom_window_from_the_file() -> None:
    path = _local_testdata("MR_small.dcm")
    ds = pydicom.dcmread(path)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    raw = ds.pixel_array.astype(np.float64)
    expected = np.clip((raw - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    out = load_image(path)
    np.testing.assert_array_equal(out[..., 0], np.rint(expected * 255))


def test_dicom_rescale_and_window_are_applied(tmp_path: Path) -> None:
    stored = np.array([[0, 50, 100, 150, 200]], dtype=np.uint16)
    path = _write_dicom(
        tmp_path / "win.dcm",
        stored,
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=100,
        WindowWidth=201,
    )
    # after rescale: -100, 0, 100, 200, 300; the linear window maps 99.5 +- 100 onto 0..1
    np.testing.assert_array_equal(load_image(path)[0, :, 0], [0, 1, 128, 255, 255])


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    stored = np.array([[0, 1000, 4000]], dtype=np.uint16)
    normal = load_image(_write_dicom(tmp_path / "m2.dcm", stored))
    inverted = load_image(_write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(normal[0, :, 0], [0, 64, 255])
    np.testing.assert_array_equal(inverted, 255 - normal)


def test_dicom_detected_by_magic_in_bytes_and_without_suffix(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / "scan.dcm", np.array([[0, 10], [20, 30]], dtype=np.uint16))
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    (tmp_path / "scan_without_suffix").write_bytes(data)
    expected = load_image(path)
    np.testing.assert_array_equal(load_image(data), expected)
    np.testing.assert_array_equal(load_image(tmp_path / "scan_without_suffix"), expected)


def test_multiframe_dicom_reads_the_middle_frame_by_default() -> None:
    path = _local_testdata("rtdose.dcm")
    frames = int(pydicom.dcmread(path).NumberOfFrames)
    middle = load_image(path)
    np.testing.assert_array_equal(middle, load_image(path, frame=frames // 2))
    assert not np.array_equal(middle, load_image(path, frame=0))
    with pytest.raises(ImageDecodeError, match=f"has {frames} frame"):
        load_image(path, frame=frames)


@pytest.mark.parametrize("name", ["examples_rgb_color.dcm", "examples_ybr_color.dcm"])
def test_colour_dicom_stays_colour(name: str) -> None:
    path = _local_testdata(name)
    ds = pydicom.dcmread(path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    out = load_image(path)
    assert out.shape == (240, 320, 3)
    expected = ds.pixel_array[frames // 2] if frames > 1 else ds.pixel_array  # pydicom: YBR -> RGB
    np.testing.assert_array_equal(out, expected)
    assert np.abs(out[..., 0].astype(int) - out[..., 2].astype(int)).max() > 40


def test_corrupt_dicom_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="DICOM"):
        load_image(_local_testdata("MR_truncated.dcm"))
    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 128 + b"DICM" + os.urandom(64))
    with pytest.raises(ImageDecodeError, match="DICOM"):
        load_image(tmp_path / "junk.dcm")
    with pytest.raises(ImageDecodeError, match="no pixel data"):
        load_image(_local_testdata("rtplan.dcm"))


def test_dicom_respects_max_pixels() -> None:
    with pytest.raises(ImageDecodeError, match="max_pixels=100"):
        load_image(_local_testdata("CT_small.dcm"), max_pixels=100)


# --------------------------------------------------------------------------------------------------
# hashing


def test_content_hash(tmp_path: Path) -> None:
    path = _png(_rgb(), tmp_path / "a.png")
    assert content_hash(path) == content_hash(path.read_bytes()) == content_hash(str(path))
    assert len(content_hash(path)) == 64
    array = np.arange(12, dtype=np.uint8)
    assert content_hash(array) == content_hash(array.copy())
    assert content_hash(array.reshape(3, 4)) != content_hash(array.reshape(4, 3))
    assert content_hash(array) != content_hash(array.astype(np.uint16))
    with pytest.raises(ImageDecodeError, match="no such file"):
        content_hash(tmp_path / "missing.png")


def test_image_extensions() -> None:
    assert {".jpg", ".jpeg", ".png", ".dcm"} <= IMAGE_EXTENSIONS
    assert all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTENSIONS)


# --------------------------------------------------------------------------------------------------
# damaged files that decoders accept silently


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth content plus noise: a few kB of scan data per 64 px, like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([128 + 90 * np.sin(x / 7 + y / 11), 128 + 70 * np.cos(y / 5), (x * 3 + y) % 256], axis=-1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _encoders(pixels: np.ndarray) -> dict[str, bytes]:
    import cv2

    def pil(**kw: object) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90, **kw)
        return buf.getvalue()

    gray = io.BytesIO()
    Image.fromarray(pixels[:, :, 0]).save(gray, format="JPEG")
    bgr = np.ascontiguousarray(pixels[:, :, ::-1])  # OpenCV encodes BGR
    return {
        "pil-420": pil(),
        "pil-444-optimized": pil(subsampling=0, optimize=True),
        "pil-progressive": pil(progressive=True),
        "pil-gray": gray.getvalue(),
        "opencv": cv2.imencode(".jpg", bgr)[1].tobytes(),
        "opencv-progressive": cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes(),
        "opencv-restart": cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_RST_INTERVAL, 2])[1].tobytes(),
    }


@pytest.mark.parametrize("size", [(96, 128), (67, 101), (7, 9)])
def test_complete_jpegs_from_every_encoder_pass(tmp_path: Path, size: tuple[int, int]) -> None:
    pixels = _photo(*size)
    for name, data in _encoders(pixels).items():
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(data)
        out = load_image(path)
        assert out.shape == (*size, 3), name
        ref = np.repeat(pixels[:, :, :1], 3, axis=2) if "gray" in name else pixels
        assert np.abs(out.astype(int) - ref.astype(int)).mean() < 12, name


def test_flat_grey_jpeg_that_is_complete_passes(tmp_path: Path) -> None:
    # ends in exactly the grey that libjpeg fills cut data with: the scan walk runs and clears it
    pixels = _photo(64, 64)
    pixels[32:] = 128
    for name, data in _encoders(pixels).items():
        (tmp_path / "g.jpg").write_bytes(data)
        assert load_image(tmp_path / "g.jpg").shape == (64, 64, 3), name


@pytest.mark.parametrize("keep", [0.3, 0.5, 0.8])
def test_jpeg_cut_short_with_its_end_marker_is_refused(tmp_path: Path, keep: float) -> None:
    for name, data in _encoders(_photo(96, 128)).items():
        if name in ("pil-progressive", "opencv-progressive") and keep > 0.5:
            continue  # a cut inside the last progressive scan is the documented gap
        cut = data[: int(len(data) * keep)] + b"\xff\xd9"
        with Image.open(io.BytesIO(cut)) as image:  # the problem: Pillow decodes it without a word
            image.load()
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(cut)
        with pytest.raises(ImageDecodeError, match=r"damaged JPEG: .*truncated.*re-export or re-download") as info:
            load_image(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value), name
        with pytest.raises(ImageDecodeError):
            load_image(cut)  # bytes go the same way


def test_float_tiff_with_nan_or_inf_is_refused(tmp_path: Path) -> None:
    values = np.linspace(0, 1, 48, dtype=np.float32).reshape(6, 8)
    ok = tmp_path / "ok.tif"
    Image.fromarray(values, mode="F").save(ok)
    assert load_image(ok)[:, :, 0].max() == 255
    for bad_value in (np.nan, np.inf, -np.inf):
        bad = values.copy()
        bad[4, 5] = bad_value
        path = tmp_path / "bad.tif"
        Image.fromarray(bad, mode="F").save(path)
        with pytest.raises(ImageDecodeError, match=r"1 of 48 pixel values are NaN or infinite \(the first at index"):
            load_image(path)
