"""Decode any supported image source into one array layout: ``(H, W, 3)`` uint8 RGB.

Every image that enters deepfeat, at training, indexing and query time, goes through
:func:`load_image`, so the pixels a model sees never depend on where an image came from.

Conversions (the contract in ``docs/contracts.md``):

* grayscale (``L``, ``1``, 8-bit arrays) is replicated to three channels;
* 16-bit images (``I;16`` PNG/TIFF, uint16 arrays) are scaled over their *full* range,
  ``round(value / 257)``, so 65535 -> 255 and 0 -> 0; an image that only uses the low bits of its
  range stays dark, as it is meant to (no per-image contrast stretch, which would make two scans of
  different exposure look alike);
* transparency (``RGBA``, ``LA``, palette with a transparent index) is composited onto **white**:
  fully transparent pixels often carry arbitrary colour (frequently black) that dropping the alpha
  channel would expose, and product photos are conventionally shown on white;
* ``CMYK``, ``YCbCr`` and palette images are converted by Pillow;
* EXIF orientation is applied (:func:`PIL.ImageOps.exif_transpose`), so a portrait photo stored
  sideways comes out upright;
* animated images (GIF, APNG, WebP) give their first frame;
* DICOM (``.dcm``/``.dicom``, or the ``DICM`` magic at byte 128) is read with pydicom: rescale
  slope/intercept (modality LUT), then the first window centre/width when present (else a min-max
  stretch), ``MONOCHROME1`` inverted so that bright means dense as in ``MONOCHROME2``; a multi-frame
  file gives its middle frame unless ``frame`` is given.

Every failure raises :class:`~deepfeat.finetune.errors.ImageDecodeError`; a broken file never turns
into a black image. Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left untouched (``False``): a
truncated file is an error, not a half-grey picture. That flag only covers files that end early; a JPEG
cut short that still ends with its end-of-image marker decodes silently in every libjpeg-based decoder,
so its structure and scan data are checked here (:mod:`deepfeat.finetune.data.jpeg`). Float images
(``F`` TIFFs, float DICOM) with a NaN or infinite pixel are refused too.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from deepfeat.finetune.data.jpeg import baseline_scan_problem, ends_in_zero_fill, jpeg_structure_problem
from deepfeat.finetune.errors import ImageDecodeError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DICOM_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "ImageSource",
    "content_hash",
    "describe_source",
    "is_dicom",
    "load_image",
]

logger = logging.getLogger(__name__)

#: Pillow's own decompression-bomb limit (about 89.5 megapixels: 1024 * 1024 * 1024 // 4 // 3).
DEFAULT_MAX_PIXELS: int = 89_478_485

#: File name endings read as DICOM even without the ``DICM`` magic (files without a preamble).
DICOM_EXTENSIONS: frozenset[str] = frozenset({".dcm", ".dicom"})

#: File name endings (lower case, with the dot) that image folders are scanned for.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
    | DICOM_EXTENSIONS
)

#: Anything :func:`load_image` accepts: a path, encoded file bytes, or a decoded array.
ImageSource: TypeAlias = str | os.PathLike[str] | bytes | bytearray | memoryview | np.ndarray

_WHITE = 255
_DICOM_MAGIC_OFFSET = 128
_HASH_CHUNK = 1 << 20


def describe_source(source: object) -> str:
    """A short, human-readable name for an image source, used in error messages and logs."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes in memory>"
    if isinstance(source, np.ndarray):
        return f"<array shape={tuple(source.shape)} dtype={source.dtype}>"
    return f"<{type(source).__name__}>"


def is_dicom(data: bytes, name: str | None = None) -> bool:
    """Whether encoded bytes are DICOM: the ``DICM`` magic at byte 128, or a DICOM file name ending."""
    if data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return True
    return name is not None and Path(name).suffix.lower() in DICOM_EXTENSIONS


def load_image(
    source: ImageSource,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    frame: int | None = None,
) -> np.ndarray:
    """Decode an image into an ``(H, W, 3)`` uint8 RGB array.

    Args:
        source: a file path (``str`` or ``os.PathLike``), the encoded bytes of a file (PNG, JPEG,
            DICOM, ...), or a decoded array: ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or
            ``(H, W, 4)``, uint8 or uint16 (arrays are always copied, never returned as a view).
        max_pixels: refuse images with more than this many pixels before decoding them
            (decompression-bomb guard). ``None`` disables deepfeat's check; Pillow still refuses
            images above twice its own ``PIL.Image.MAX_IMAGE_PIXELS``.
        frame: for multi-frame DICOM, the frame to read (0-based); ``None`` reads the middle frame.
            Ignored for other formats (animated GIF/PNG/WebP always give their first frame).

    Returns:
        A C-contiguous ``(H, W, 3)`` uint8 array in RGB order.

    Raises:
        ImageDecodeError: the file is missing, a broken link, empty, truncated, not an image, in an
            unsupported format or mode, too large, or a DICOM without usable pixel data.
    """
    name = describe_source(source)
    if isinstance(source, np.ndarray):
        return _from_array(source, name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        path_name: str | None = None
    elif isinstance(source, (str, os.PathLike)):
        data = _read_file(Path(source))
        path_name = name
    else:
        raise ImageDecodeError(
            name,
            "unsupported source type; pass a file path, the encoded file bytes, or a numpy array",
        )
    if not data:
        raise ImageDecodeError(name, "the file is empty (0 bytes); re-export or re-download it")
    if is_dicom(data, path_name):
        return _decode_dicom(data, name, max_pixels=max_pixels, frame=frame)
    return _decode_pil(data, name, max_pixels=max_pixels)


def content_hash(source: ImageSource) -> str:
    """SHA-256 (hex) identifying an image's content, for de-duplication and change detection.

    For a path, the hash of the file bytes (streamed, the image is not decoded); for bytes, the hash
    of those bytes; for an array, the hash of its dtype, shape and C-order bytes, so two arrays with
    the same buffer but different shapes differ.

    Raises:
        ImageDecodeError: the path does not exist, is a broken link or is not a file.
    """
    digest = hashlib.sha256()
    if isinstance(source, np.ndarray):
        digest.update(f"ndarray:{source.dtype.str}:{tuple(source.shape)}:".encode())
        digest.update(np.ascontiguousarray(source).tobytes())
    elif isinstance(source, (bytes, bytearray, memoryview)):
        digest.update(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        _check_path(path)
        try:
            with path.open("rb") as handle:
                while chunk := handle.read(_HASH_CHUNK):
                    digest.update(chunk)
        except OSError as exc:
            raise ImageDecodeError(path, f"cannot read the file: {exc.strerror or exc}") from exc
    else:
        raise ImageDecodeError(describe_source(source), "unsupported source type for content_hash")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# files


def _check_path(path: Path) -> None:
    if path.is_symlink() and not path.exists():
        target = os.readlink(path)
        raise ImageDecodeError(
            path, f"it is a broken symbolic link (points to missing {target!r}); fix or remove the link"
        )
    if not path.exists():
        raise ImageDecodeError(path, "no such file; check the path and the data root")
    if not path.is_file():
        raise ImageDecodeError(path, "it is a directory or special file, not an image file")


def _read_file(path: Path) -> bytes:
    _check_path(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot read the file: {exc.strerror or exc}") from exc


# --------------------------------------------------------------------------------------------------
# arrays


def _from_array(array: np.ndarray, name: str) -> np.ndarray:
    if array.size == 0:
        raise ImageDecodeError(name, "the array is empty")
    if array.dtype == np.uint16:
        array = _scale_uint16(array)
    elif array.dtype != np.uint8:
        raise ImageDecodeError(
            name,
            f"arrays must be uint8 or uint16, got {array.dtype}; convert floats in [0, 1] with "
            "(a * 255).round().astype(np.uint8)",
        )
    if array.ndim == 2:
        return _gray_to_rgb(array)
    if array.ndim == 3 and array.shape[2] == 1:
        return _gray_to_rgb(array[:, :, 0])
    if array.ndim == 3 and array.shape[2] == 3:
        return np.array(array, dtype=np.uint8, order="C", copy=True)
    if array.ndim == 3 and array.shape[2] == 4:
        return _composite_on_white(array[:, :, :3], array[:, :, 3])
    hint = ""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4):
        hint = "; it looks channels-first, pass np.transpose(a, (1, 2, 0))"
    raise ImageDecodeError(
        name, f"arrays must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {tuple(array.shape)}{hint}"
    )


def _scale_uint16(array: np.ndarray) -> np.ndarray:
    """Full-range 16 -> 8 bit: round(v / 257), exact at both ends (0 -> 0, 65535 -> 255)."""
    return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.uint32)[:, :, None]
    out = (rgb.astype(np.uint32) * a + _WHITE * (255 - a) + 127) // 255
    return np.ascontiguousarray(out.astype(np.uint8))


# --------------------------------------------------------------------------------------------------
# Pillow


def _decode_pil(data: bytes, name: str, *, max_pixels: int | None) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # deepfeat applies its own, per-call limit below; Pillow's global one only warns here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(name, f"decompression bomb refused by Pillow: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            name, f"not an image, or a format Pillow cannot read (file starts with {data[:12]!r})"
        ) from exc
    except Exception as exc:  # Pillow raises many types for corrupt headers
        raise ImageDecodeError(name, f"corrupt image header ({type(exc).__name__}: {exc})") from exc

    with image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageDecodeError(
                name,
                f"decompression bomb guard: {width} x {height} = {width * height} pixels is more than "
                f"max_pixels={max_pixels}; if the image is trusted, pass a larger max_pixels",
            )
        if image.format == "JPEG":
            problem = jpeg_structure_problem(data)
            if problem is not None:
                raise ImageDecodeError(name, f"damaged JPEG: {problem}; re-export or re-download it")
        if getattr(image, "is_animated", False):
            logger.debug(
                "%s is animated (%s frames); using the first frame", name, getattr(image, "n_frames", "?")
            )
            image.seek(0)
        try:
            image.load()
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            if "truncated" in reason:
                reason = f"the file is truncated ({reason}); re-export or re-download it"
            else:
                # e.g. a TIFF with WebP/JPEG 2000 compression that this Pillow/libtiff build lacks
                compression = image.info.get("compression")
                unsupported = (f" with compression {compression!r}, which this Pillow build may not support "
                               f"(convert the file to PNG or JPEG)" if compression else "")
                reason = (f"cannot decode the pixel data of this {image.format or 'image'} file{unsupported} "
                          f"({type(exc).__name__}: {reason})")
            raise ImageDecodeError(name, reason) from exc
        if image.format == "JPEG":
            _check_jpeg_scan(data, image, name)
        return _pil_to_rgb(_exif_upright(image, name), name)


def _check_jpeg_scan(data: bytes, image: Image.Image, name: str) -> None:
    """Refuse a JPEG whose scan data was cut short although its end marker is there (libjpeg fills the
    rest with flat grey and only warns): walked exactly when the decoded image ends in that grey."""
    if image.mode not in ("L", "RGB") or not ends_in_zero_fill(np.asarray(image)):
        return
    problem = baseline_scan_problem(data)
    if problem is not None:
        raise ImageDecodeError(name, f"damaged JPEG: {problem}; re-export or re-download it")


def _exif_upright(image: Image.Image, name: str) -> Image.Image:
    try:
        upright = ImageOps.exif_transpose(image)
    except Exception as exc:  # corrupt EXIF must not cost the pixels, which decoded fine
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", name, exc)
        return image
    return image if upright is None else upright


def _pil_to_rgb(image: Image.Image, name: str) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        return np.array(image, dtype=np.uint8, order="C")
    if mode in ("L", "1"):
        return _gray_to_rgb(np.asarray(image.convert("L"), dtype=np.uint8))
    if mode.startswith("I;16"):
        return _gray_to_rgb(_scale_uint16(np.asarray(image).astype(np.uint16)))
    if mode == "I":
        return _gray_to_rgb(_int_to_uint8(np.asarray(image), name))
    if mode == "F":
        return _gray_to_rgb(_min_max(np.asarray(image, dtype=np.float64), name))
    if mode in ("P", "PA", "RGBA", "LA", "La", "RGBa"):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint8)
        return _composite_on_white(rgba[:, :, :3], rgba[:, :, 3])
    try:
        return np.array(image.convert("RGB"), dtype=np.uint8, order="C")
    except Exception as exc:
        raise ImageDecodeError(
            name, f"unsupported image mode {mode!r}; convert the file to RGB or grayscale"
        ) from exc


def _int_to_uint8(values: np.ndarray, name: str) -> np.ndarray:
    """32-bit integer images: treated as 16-bit when they fit 0..65535, else stretched min-max."""
    low, high = int(values.min()), int(values.max())
    if low >= 0 and high <= 0xFFFF:
        return _scale_uint16(values.astype(np.uint16))
    logger.debug("%s: 32-bit values %d..%d outside 16-bit range; stretching min-max", name, low, high)
    return _min_max(values.astype(np.float64), name)


def _require_finite(values: np.ndarray, name: str) -> np.ndarray:
    """``values`` when every one is finite; NaN or infinite pixels (a damaged float TIFF or DICOM, or
    no-data markers) are refused rather than painted as some grey level."""
    bad = ~np.isfinite(values)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ImageDecodeError(
            name,
            f"{int(bad.sum())} of {values.size} pixel values are NaN or infinite (the first at index {where}); "
            f"the file is damaged or marks missing data with NaN/inf: replace them and re-export it",
        )
    return values


def _min_max(values: np.ndarray, name: str) -> np.ndarray:
    """Stretch to 0..255; a constant image maps to 0 (its content, not a failure).

    Raises:
        ImageDecodeError: a value is NaN or infinite.
    """
    values = _require_finite(values, name)
    low, high = float(values.min()), float(values.max())
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.clip(np.rint((values - low) * scale), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# DICOM


def _decode_dicom(data: bytes, name: str, *, max_pixels: int | None, frame: int | None) -> np.ndarray:
    try:
        import pydicom
        from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array
    except ImportError as exc:  # pydicom is a core dependency, but say what to do if it is gone
        raise ImageDecodeError(name, "reading DICOM needs pydicom: pip install pydicom") from exc

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # pydicom raises many types for corrupt files
        raise ImageDecodeError(name, f"corrupt DICOM file ({type(exc).__name__}: {exc})") from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageDecodeError(
            name, f"the DICOM file holds no pixel data (SOP class {ds.get('SOPClassUID', 'unknown')})"
        )
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    except Exception as exc:
        raise ImageDecodeError(name, f"corrupt DICOM image header ({exc})") from exc
    if max_pixels is not None and rows * columns > max_pixels:
        raise ImageDecodeError(
            name,
            f"decompression bomb guard: {columns} x {rows} = {rows * columns} pixels is more than "
            f"max_pixels={max_pixels}; if the image is trusted, pass a larger max_pixels",
        )
    index = n_frames // 2 if frame is None else frame
    if not -n_frames <= index < n_frames:
        raise ImageDecodeError(name, f"frame {frame} requested but the file has {n_frames} frame(s)")
    index %= n_frames
    if n_frames > 1:
        logger.debug("%s: multi-frame DICOM (%d frames); reading frame %d", name, n_frames, index)

    try:
        pixels: np.ndarray = pixel_array(ds, index=index if n_frames > 1 else None)
    except Exception as exc:
        raise ImageDecodeError(
            name, f"cannot decode the DICOM pixel data ({type(exc).__name__}: {exc})"
        ) from exc

    if photometric == "PALETTE COLOR":
        try:
            pixels = apply_color_lut(pixels, ds)
        except Exception as exc:
            raise ImageDecodeError(name, f"cannot apply the DICOM colour palette ({exc})") from exc
        return _color_to_uint8(pixels, name)
    if samples == 3:
        # pydicom converts YBR_* to RGB while decoding
        return _color_to_uint8(pixels, name)
    if samples != 1:
        raise ImageDecodeError(name, f"unsupported DICOM SamplesPerPixel={samples}")

    try:
        values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    except Exception as exc:
        raise ImageDecodeError(name, f"cannot apply the DICOM rescale / modality LUT ({exc})") from exc
    values = _require_finite(values, name)
    unit = _dicom_window(values, ds, index, name)
    gray = _min_max(values, name) if unit is None else np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return _gray_to_rgb(gray)


def _color_to_uint8(pixels: np.ndarray, name: str) -> np.ndarray:
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ImageDecodeError(name, f"unexpected DICOM colour pixel shape {tuple(pixels.shape)}")
    if pixels.dtype == np.uint8:
        return np.ascontiguousarray(pixels)
    if pixels.dtype == np.uint16:
        return _scale_uint16(pixels)
    return np.stack([_min_max(pixels[:, :, c].astype(np.float64), name) for c in range(3)], axis=2)


def _first_number(value: Any) -> float | None:
    """WindowCenter/Width may be multi-valued (several presets); the first one is the default."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        if len(value) == 0:
            return None
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _window_attributes(ds: Any, index: int) -> tuple[float | None, float | None, str]:
    center = _first_number(ds.get("WindowCenter"))
    width = _first_number(ds.get("WindowWidth"))
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if center is not None and width is not None:
        return center, width, function
    # enhanced multi-frame objects keep the window in (per-frame or shared) functional groups
    for groups, item in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        sequence = ds.get(groups)
        if not sequence or item >= len(sequence):
            continue
        voi = sequence[item].get("FrameVOILUTSequence")
        if voi:
            center = _first_number(voi[0].get("WindowCenter"))
            width = _first_number(voi[0].get("WindowWidth"))
            function = str(voi[0].get("VOILUTFunction", function) or function).strip().upper()
            if center is not None and width is not None:
                return center, width, function
    return None, None, function


def _dicom_window(values: np.ndarray, ds: Any, index: int, name: str) -> np.ndarray | None:
    """Values in [0, 1] after the VOI window (DICOM PS3.3 C.11.2.1.2), or None when there is none."""
    center, width, function = _window_attributes(ds, index)
    if center is None or width is None:
        return None
    if function == "SIGMOID":
        if width <= 0:
            return None
        return np.asarray(1.0 / (1.0 + np.exp(-4.0 * (values - center) / width)))
    if function == "LINEAR_EXACT":
        if width <= 0:
            return None
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width < 1:
        logger.debug("%s: ignoring invalid window width %s; stretching min-max", name, width)
        return None
    if width == 1:
        return (values >= center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
