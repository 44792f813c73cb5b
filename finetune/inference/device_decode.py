"""JPEG decoding and preprocessing on the model's device, for embedding on a GPU.

On a GPU, decoding and resizing in DataLoader workers caps throughput well below the model: one CPU
core decodes and resizes a few hundred 256 px JPEGs a second, while EfficientNet-Lite0 embeds tens of
thousands a second under bf16. With ``decode="device"`` the workers only read (and hash) the file
bytes; the batch is decoded by ``torchvision.io.decode_jpeg`` on the device (nvJPEG on CUDA), then
resized, centre-cropped and normalised there with torch ops that follow the bundle's preprocessing.

What stays on the CPU path, per image, decided in the worker from the header alone: anything that
is not a baseline/progressive JPEG in RGB or grayscale (PNG, WebP, DICOM, CMYK JPEGs, in-memory
arrays), files whose marker structure is damaged or cut short
(:func:`deepfeat.finetune.data.jpeg.jpeg_structure_problem`: no end-of-image marker, restart intervals
or progressive scans missing), and images above the decompression-bomb limit (the CPU path raises the
clear error). An image the device decoder rejects, or whose decoded pixels end in the flat grey that a
decoder leaves for cut scan data, is retried on the CPU, which refuses a cut file; one that fails there
is reported like any other bad image, never zero-filled.

The device resize is antialiased bilinear/bicubic in torch, the worker path OpenCV's area filter
for downscaling: the two agree closely (mean cosine of the embeddings about 0.99+; the embedding
benchmark prints it) but not bit for bit. Use one decode path per collection when exact vector
reproducibility matters.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch

from deepfeat.finetune.data.jpeg import jpeg_structure_problem
from deepfeat.finetune.models.backbones import Preprocessing

log = logging.getLogger(__name__)

JPEG_START = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"
_EXIF_ORIENTATION = 0x0112


_SOF_DEVICE = (0xC0, 0xC1, 0xC2)  # baseline, extended and progressive Huffman: what both decoders read alike
_SOF_OTHER = frozenset(range(0xC3, 0xD0)) - {0xC4, 0xC8, 0xCC}  # lossless, arithmetic: the CPU path


def jpeg_for_device(data: bytes, max_pixels: int | None) -> int | None:
    """The EXIF orientation (1-8) of a complete JPEG the device decoder handles like Pillow does, or
    ``None`` when the image must take the CPU path.

    Walks the marker segments up to the frame header (no decoding, a few microseconds; this runs for
    every image in the DataLoader workers): an 8-bit Huffman-coded JPEG with 1 (gray) or 3 (YCbCr/RGB)
    components, at most ``max_pixels`` pixels, ending with the end-of-image marker (zero padding
    allowed). The orientation is returned because nvJPEG ignores it (``decode_jpeg(device="cuda")``
    does not apply it): the caller applies it with :func:`orient`, as Pillow's ``exif_transpose`` does
    on the CPU path. Anything unusual (CMYK, 12-bit, lossless, a damaged header) goes to the CPU path,
    which decodes it or says what is wrong.
    """
    if not data.startswith(JPEG_START) or not data.rstrip(b"\x00").endswith(JPEG_END):
        return None
    if jpeg_structure_problem(data) is not None:  # damaged or cut short: the CPU path says what is wrong
        return None
    orientation, i, n = 1, 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker < 0xC0 or 0xD0 <= marker <= 0xD9:  # not a segment a header may hold here
            return None
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2 or i + 2 + length > n:
            return None
        segment = data[i + 4 : i + 2 + length]
        if marker == 0xE1 and segment.startswith(b"Exif\x00\x00"):
            orientation = _exif_orientation(segment[6:])
        elif marker in _SOF_OTHER:
            return None
        elif marker in _SOF_DEVICE:
            if len(segment) < 6 or segment[0] != 8 or segment[5] not in (1, 3):
                return None
            height, width = int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big")
            if height == 0 or width == 0 or (max_pixels is not None and height * width > max_pixels):
                return None
            return orientation
        elif marker == 0xDA:  # scan data before any frame header: damaged
            return None
        i += 2 + length
    return None


def _exif_orientation(tiff: bytes) -> int:
    """The Orientation tag (0x0112) of IFD0 of an EXIF TIFF block, 1 when absent or unreadable."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order: Literal["little", "big"] = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    count = int.from_bytes(tiff[ifd : ifd + 2], order)
    for k in range(count):
        entry = ifd + 2 + 12 * k
        if entry + 12 > len(tiff):
            break
        if int.from_bytes(tiff[entry : entry + 2], order) == _EXIF_ORIENTATION:
            value = int.from_bytes(tiff[entry + 8 : entry + 10], order)
            return value if 1 <= value <= 8 else 1
    return 1


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Turn a decoded (C, H, W) image upright by its EXIF orientation, as ``PIL.ImageOps.exif_transpose``."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1, -2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return image.transpose(-1, -2).flip(-1)
    if orientation == 7:
        return image.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return image.transpose(-1, -2).flip(-2)
    return image


def encoded_item(data: bytes, index: int, label: int, orientation: int) -> dict[str, Any]:
    """The dataset item of a JPEG left to the device: its bytes, their SHA-256 (raw 32 bytes; the
    ``content_hash`` is its hex) and its EXIF orientation."""
    return {
        "encoded": data,
        "index": index,
        "label": label,
        "digest": hashlib.sha256(data).digest(),
        "orientation": orientation,
    }


def decode_on_device(
    encoded: Sequence[torch.Tensor], device: torch.device, orientations: Sequence[int] | None = None
) -> list[torch.Tensor | None]:
    """Decode JPEGs (1-D uint8 CPU tensors of the file bytes) on ``device`` into upright (3, H, W) uint8
    RGB tensors (``orientations``: their EXIF orientations, from :func:`jpeg_for_device`).

    The whole list is decoded in one call (nvJPEG batches it on CUDA, in hardware on A100/H100); if
    that fails, each image is decoded alone, and the ones that still fail come back as ``None`` for
    the caller's CPU fallback.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    kw: dict[str, Any] = {"mode": ImageReadMode.RGB, "device": device}  # orientation: applied below, on any device
    if not encoded:
        return []
    out: list[torch.Tensor | None]
    try:
        out = list(decode_jpeg(list(encoded), **kw))
    except RuntimeError as exc:
        log.debug("batched device decode failed (%s); decoding one by one", exc)
        out = []
        for tensor in encoded:
            try:
                out.append(decode_jpeg(tensor, **kw))
            except RuntimeError:
                out.append(None)
    out = _drop_zero_filled(out)
    if orientations is not None:
        out = [None if im is None else orient(im, o) for im, o in zip(out, orientations, strict=True)]
    return out


def _drop_zero_filled(images: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """``None`` for each decoded image whose last 8 x 8 pixels are the flat mid-grey that a JPEG decoder
    leaves where the scan data was cut short (its end marker still there): the CPU path then walks that
    file's scan data exactly (:func:`deepfeat.finetune.data.jpeg.baseline_scan_problem`) and refuses it
    or decodes it. One batched check, one device-to-host copy per batch; images under 8 px go there too."""
    present = [(k, im) for k, im in enumerate(images) if im is not None]
    suspects = {k for k, im in present if min(int(im.shape[-2]), int(im.shape[-1])) < 8}
    sized = [(k, im) for k, im in present if k not in suspects]
    if sized:
        corners = torch.stack([im[:3, -8:, -8:] for _, im in sized]).to(torch.int32)
        luma = (299 * corners[:, 0] + 587 * corners[:, 1] + 114 * corners[:, 2]) // 1000
        flags = ((luma - 128).abs() <= 2).flatten(1).all(dim=1).tolist()
        suspects |= {k for (k, _), flag in zip(sized, flags, strict=True) if flag}
    if suspects:
        log.debug("%d device-decoded JPEG(s) end in flat mid-grey; checking them on the CPU", len(suspects))
    return [None if k in suspects else im for k, im in enumerate(images)]


def _weights(n_in: int, n_out: int, kind: str) -> torch.Tensor:
    """(n_out, n_in) float64 matrix of OpenCV's 1-D resampling from ``n_in`` to ``n_out`` pixels.

    ``area``: each output pixel averages the input span it covers, partial pixels weighted by overlap
    (``cv2.INTER_AREA`` when shrinking). ``bilinear``/``bicubic`` (a = -0.75) and ``nearest``: OpenCV's
    half-pixel-centre sampling with replicated borders (``cv2.resize``'s convention).
    """
    scale = n_in / n_out
    j = torch.arange(n_in, dtype=torch.float64)
    if kind == "area":
        lo = torch.arange(n_out, dtype=torch.float64)[:, None] * scale
        overlap = (torch.minimum(lo + scale, j[None] + 1) - torch.maximum(lo, j[None])).clamp_(min=0)
        return overlap / scale
    w = torch.zeros((n_out, n_in), dtype=torch.float64)
    rows = torch.arange(n_out)
    if kind == "area_linear":  # cv2.INTER_AREA when not shrinking both ways: its own linear weights
        inv = n_out / n_in  # OpenCV's arithmetic exactly: floor(dx * (1 / inv)) decides ties like 140 * 200 / 224
        sx = torch.floor(rows.to(torch.float64) * (1 / inv))
        fx = ((rows + 1) - (sx + 1) * inv).float().double()
        fx = torch.where(fx <= 0, torch.zeros_like(fx), fx - torch.floor(fx))
        for k, c in ((0, 1 - fx), (1, fx)):
            w.index_put_((rows, (sx.long() + k).clamp_(0, n_in - 1)), c, accumulate=True)
        return w
    centre = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5
    if kind == "nearest":
        src = torch.floor(torch.arange(n_out, dtype=torch.float64) * scale).long().clamp_(max=n_in - 1)
        w[torch.arange(n_out), src] = 1.0
        return w
    base = torch.floor(centre)
    t = centre - base
    if kind == "bilinear":
        taps, coeffs = [0, 1], [1 - t, t]
    else:
        a = -0.75

        def cubic(x: torch.Tensor) -> torch.Tensor:
            x = x.abs()
            return torch.where(
                x <= 1,
                ((a + 2) * x - (a + 3)) * x * x + 1,
                torch.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, torch.zeros_like(x)),
            )

        taps = [-1, 0, 1, 2]
        coeffs = [cubic(t - k) for k in taps]
    for k, c in zip(taps, coeffs, strict=True):
        w.index_put_((rows, (base.long() + k).clamp_(0, n_in - 1)), c, accumulate=True)
    return w


class DevicePreprocess:
    """The bundle's evaluation preprocessing on decoded uint8 tensors, on their device.

    Mirrors :func:`deepfeat.finetune.data.transforms.build_transforms` (``train=False``), which runs
    OpenCV through albumentations: ``squash`` resizes to the input size; ``shorter_side_crop`` scales
    so the image covers ``input_size / crop_pct``, then centre-crops; shrinking uses the area filter
    (``area_for_downscale``), enlarging the bundle's interpolation; the result is rounded to 8 bits as
    OpenCV's is, then normalised, ``(x / 255 - mean) / std``. Each resize is two small matrix products
    (rows, then columns) with OpenCV's 1-D weights, so device and worker preprocessing agree to within
    rounding. Images of the same size go through as one batch.
    """

    def __init__(self, preprocessing: Preprocessing, device: torch.device) -> None:
        self.pre = preprocessing
        self.device = device
        self.mean = torch.tensor(preprocessing.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(preprocessing.std, device=device).view(1, 3, 1, 1) * 255
        self._cache: dict[tuple[int, int, str], torch.Tensor] = {}

    def _matrix(self, n_in: int, n_out: int, kind: str) -> torch.Tensor:
        key = (n_in, n_out, kind)
        if key not in self._cache:
            self._cache[key] = _weights(n_in, n_out, kind).to(self.device, torch.float32)
        return self._cache[key]

    def _plan(self, h: int, w: int) -> tuple[int, int, str]:
        """Output size of the resize and the filter, as albumentations decides them."""
        height, width = self.pre.input_size
        if self.pre.resize_mode == "squash":
            if height < h or width < w:  # albumentations asks OpenCV for INTER_AREA, which averages
                # only when both sides shrink (or stay), and otherwise weights linearly in its own way
                return height, width, "area" if height <= h and width <= w else "area_linear"
            return height, width, self.pre.interpolation
        target_h, target_w = math.floor(height / self.pre.crop_pct), math.floor(width / self.pre.crop_pct)
        scale = max(target_h / h, target_w / w)
        return max(1, round(h * scale)), max(1, round(w * scale)), "area" if scale < 1.0 else self.pre.interpolation

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        out_h, out_w, kind = self._plan(h, w)
        if (out_h, out_w) != (h, w):
            x = torch.matmul(self._matrix(h, out_h, kind), x)  # rows: (out_h, h) @ (..., h, w)
            x = torch.matmul(x, self._matrix(w, out_w, kind).T)  # columns
            x = x.round_().clamp_(0, 255)
        height, width = self.pre.input_size
        top, left = (out_h - height) // 2, (out_w - width) // 2  # albumentations' CenterCrop offsets
        return x[..., top : top + height, left : left + width]

    def __call__(self, images: Sequence[torch.Tensor], channels_last: bool = True) -> torch.Tensor:
        """Stack ``images`` ((3, H, W) uint8, any sizes) into one normalised float batch, in order."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault((int(image.shape[-2]), int(image.shape[-1])), []).append(i)
        height, width = self.pre.input_size
        if len(groups) == 1:  # the common case (a catalogue of one image size): no scatter
            out = self._resize(torch.stack(list(images)).float())
        else:
            out = torch.empty((len(images), 3, height, width), device=self.mean.device)
            for members in groups.values():
                x = torch.stack([images[i] for i in members]).float()
                out[torch.tensor(members, device=out.device)] = self._resize(x)
        out = (out - self.mean) / self.std
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out
