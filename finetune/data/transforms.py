"""Albumentations pipelines derived from a backbone's own preprocessing config.

The evaluation pipeline mirrors timm's ``transforms_imagenet_eval`` so that a fine-tuned model sees
the same pixels its pretrained weights were made for:

* ``resize_mode="shorter_side_crop"`` (timm's default ``crop_mode="center"``): scale the image,
  keeping its aspect ratio, until it covers ``floor(size / crop_pct)`` in both dimensions (for a
  square input, the shorter side becomes ``floor(size / crop_pct)``), then crop the centre
  ``input_size``;
* ``resize_mode="squash"``: resize to exactly ``input_size``, ignoring the aspect ratio and
  ``crop_pct`` (timm's ``crop_mode="squash"`` with ``crop_pct=1``: nothing of the image is lost).

Resizing is done by OpenCV with the backbone's interpolation; when an image is *shrunk*, area
interpolation is used instead, which averages like Pillow's antialiased resize (plain bilinear
downscaling by OpenCV would alias). Then ``Normalize(mean, std)`` on 0..255 input and
``ToTensorV2``: every pipeline returns ``{"image": (3, H, W) float32 tensor}``.

Training presets add augmentation around that resize:

* ``"fashion"``: ``RandomResizedCrop(scale=(0.6, 1))`` (mild, garments stay recognisable),
  horizontal flip, brightness/contrast/saturation jitter. **No hue jitter**: colour is a product
  attribute, and a red dress turned orange is a different product to retrieve.
* ``"medical"``: small affine (rotation <= 10 degrees, scale 0.9-1.1, translation <= 5 %, black
  border as in scans), CLAHE on the luminance. **No colour jitter** and grayscale stays exactly
  grayscale (CLAHE on a gray image is applied to its single channel and replicated), so no
  colour appears that no scanner makes. **No horizontal flip by default**: laterality is anatomy
  (a mirrored chest X-ray shows the heart on the wrong side; L/R markers become unreadable); pass
  ``hflip=True`` for data where it is safe (e.g. dermoscopy, histology).
* ``"flip"``: the evaluation pipeline plus a horizontal flip: for short training budgets on
  centred, normalised images (Fashion-MNIST-like catalogues), where cropping and jitter slow
  convergence more than they add robustness (measured on Fashion-MNIST, Lite0 at 48 px, 12-15
  minutes on 2 CPU cores: test Recall@1 0.900 with ``flip`` against 0.888 with ``fashion``).
* ``"shift"``: ``"flip"`` plus a small random translation: the evaluation resize, then a random
  crop of the input size where the evaluation pipeline crops the centre (the ``crop_pct`` margin:
  up to 3 px each way at 48 px), so objects keep the scale they have at query time; with
  ``resize_mode="squash"`` (no margin) a whole-pixel shift of up to 6 % (black padding, then a
  random crop). The classic pad-and-crop augmentation of small centred images (Fashion-MNIST,
  CIFAR); on Fashion-MNIST it did not beat ``flip`` within 17 minutes on 2 CPU cores (benchmarks/README.md).
* ``"none"``: the evaluation pipeline.

Any training preset takes ``erasing=p``: random erasing (Zhong et al., AAAI 2020; torchvision's
``RandomErasing``): with probability ``p`` a rectangle of 2-25 % of the image is set to the
normalised mean (0 after ``Normalize``), after all other steps, so a model cannot lean on any one
region of a garment.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Literal, Protocol, get_args, runtime_checkable

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from deepfeat.finetune.data.images import load_image
from deepfeat.finetune.errors import DataError

__all__ = [
    "INTERPOLATIONS",
    "Interpolation",
    "PreprocessingLike",
    "Preset",
    "ResizeMode",
    "build_eval_transforms",
    "build_transforms",
    "preprocess_batch",
    "reseed_in_worker",
]

Preset = Literal["fashion", "flip", "shift", "medical", "none"]
Interpolation = Literal["bilinear", "bicubic", "nearest"]
ResizeMode = Literal["squash", "shorter_side_crop"]

#: OpenCV flags for the interpolation names of a preprocessing config (timm's names).
INTERPOLATIONS: dict[str, int] = {
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
}


@runtime_checkable
class PreprocessingLike(Protocol):
    """What the transforms need from a preprocessing config.

    ``deepfeat.finetune.models.backbones.Preprocessing`` (a frozen dataclass) is the concrete type; any
    object with these attributes works.
    """

    @property
    def input_size(self) -> tuple[int, int]:
        """Model input (height, width) in pixels."""
        ...

    @property
    def mean(self) -> Sequence[float]:
        """Per-channel (R, G, B) mean of pixels scaled to [0, 1]."""
        ...

    @property
    def std(self) -> Sequence[float]:
        """Per-channel (R, G, B) standard deviation of pixels scaled to [0, 1]."""
        ...

    @property
    def interpolation(self) -> str:
        """``"bilinear"``, ``"bicubic"`` or ``"nearest"``."""
        ...

    @property
    def crop_pct(self) -> float:
        """Share of the resized image kept by the centre crop in ``shorter_side_crop`` mode."""
        ...

    @property
    def resize_mode(self) -> str:
        """``"squash"`` or ``"shorter_side_crop"``."""
        ...


_Key = tuple[tuple[int, int], tuple[float, ...], tuple[float, ...], str, float, str]


def _key(preprocessing: PreprocessingLike) -> _Key:
    """Check a preprocessing config and reduce it to a hashable, exact key."""
    try:
        height, width = (int(v) for v in preprocessing.input_size)
        mean = tuple(float(v) for v in preprocessing.mean)
        std = tuple(float(v) for v in preprocessing.std)
        interpolation = str(preprocessing.interpolation)
        crop_pct = float(preprocessing.crop_pct)
        resize_mode = str(preprocessing.resize_mode)
    except (AttributeError, TypeError, ValueError) as exc:
        raise DataError(
            "preprocessing must have input_size (H, W), mean and std (3 floats), interpolation, "
            f"crop_pct and resize_mode; got {preprocessing!r} ({exc})"
        ) from exc
    problems = []
    if height < 1 or width < 1:
        problems.append(f"input_size must be positive, got {(height, width)}")
    if len(mean) != 3 or len(std) != 3:
        problems.append(f"mean and std need 3 values (R, G, B), got {mean} and {std}")
    if any(s <= 0 for s in std):
        problems.append(f"std must be positive, got {std}")
    if interpolation not in INTERPOLATIONS:
        problems.append(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
    if not 0 < crop_pct <= 1:
        problems.append(f"crop_pct must be in (0, 1], got {crop_pct}")
    if resize_mode not in get_args(ResizeMode):
        problems.append(f"resize_mode must be one of {list(get_args(ResizeMode))}, got {resize_mode!r}")
    if problems:
        raise DataError("invalid preprocessing config: " + "; ".join(problems))
    return (height, width), mean, std, interpolation, crop_pct, resize_mode


def _resize_steps(key: _Key, shift: bool = False) -> list[A.BasicTransform]:
    """The evaluation resize (and crop); ``shift``: a random crop (or translation) instead of the centre."""
    (height, width), _, _, interpolation, crop_pct, resize_mode = key
    flag = INTERPOLATIONS[interpolation]
    if resize_mode == "squash":
        steps: list[A.BasicTransform] = [A.Resize(height, width, interpolation=flag, area_for_downscale="image")]
        if shift:  # pad-and-crop: whole-pixel shifts, no resampling blur
            pad_h, pad_w = max(1, round(0.06 * height)), max(1, round(0.06 * width))
            steps += [A.PadIfNeeded(height + 2 * pad_h, width + 2 * pad_w, border_mode=cv2.BORDER_CONSTANT, fill=0),
                      A.RandomCrop(height, width)]
        return steps
    scale_h, scale_w = math.floor(height / crop_pct), math.floor(width / crop_pct)
    return [
        A.SmallestMaxSize(max_size_hw=(scale_h, scale_w), interpolation=flag, area_for_downscale="image"),
        A.RandomCrop(height, width) if shift else A.CenterCrop(height, width),
    ]


def _tail(key: _Key) -> list[A.BasicTransform]:
    _, mean, std, *_ = key
    return [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]


class _LuminanceCLAHE(A.ImageOnlyTransform):  # type: ignore[misc]
    """CLAHE on the luminance that keeps gray images exactly gray.

    A gray image (all channels equal) is equalised on its single channel and replicated, so no
    colour tint appears from a round trip through LAB; a colour image is equalised on L of LAB.
    """

    def __init__(
        self, clip_limit: float = 2.0, tile_grid_size: tuple[int, int] = (8, 8), p: float = 0.5
    ) -> None:
        super().__init__(p=p)
        self.clip_limit = clip_limit
        self.tile_grid_size = tile_grid_size

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        clahe = cv2.createCLAHE(clipLimit=self.clip_limit, tileGridSize=self.tile_grid_size)
        if img.ndim == 2:
            return np.asarray(clahe.apply(img))
        if img.shape[2] == 1:
            return np.asarray(clahe.apply(img[:, :, 0]))[:, :, None]
        if np.array_equal(img[:, :, 0], img[:, :, 1]) and np.array_equal(img[:, :, 0], img[:, :, 2]):
            channel = clahe.apply(np.ascontiguousarray(img[:, :, 0]))
            return np.repeat(channel[:, :, None], img.shape[2], axis=2)
        lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB)
        lab[:, :, 0] = clahe.apply(lab[:, :, 0])
        return np.asarray(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB))

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("clip_limit", "tile_grid_size")


def build_eval_transforms(preprocessing: PreprocessingLike) -> A.Compose:
    """The deterministic evaluation / indexing / query pipeline (see the module docstring)."""
    return _eval_compose(_key(preprocessing))


def _eval_compose(key: _Key) -> A.Compose:
    return A.Compose([*_resize_steps(key), *_tail(key)])


@functools.lru_cache(maxsize=8)
def _cached_eval_compose(key: _Key) -> A.Compose:
    # only for preprocess_batch, which never hands the pipeline out
    return _eval_compose(key)


def build_transforms(
    preprocessing: PreprocessingLike,
    *,
    preset: Preset,
    train: bool,
    hflip: bool | None = None,
    erasing: float = 0.0,
    seed: int | None = None,
) -> A.Compose:
    """Build the albumentations pipeline for a backbone's preprocessing and a domain preset.

    Call it as ``pipeline(image=array)["image"]`` on an ``(H, W, 3)`` uint8 RGB array (the output of
    :func:`~deepfeat.finetune.data.images.load_image`); the result is a ``(3, H, W)`` float32 tensor,
    normalised with the backbone's mean and std.

    Args:
        preprocessing: the backbone's config (input size, mean/std, interpolation, crop, resize).
        preset: ``"fashion"``, ``"flip"``, ``"shift"``, ``"medical"`` or ``"none"`` (see the module docstring).
        train: ``False`` always gives the evaluation pipeline, whatever the preset.
        hflip: override the preset's horizontal flip (fashion: on, medical: off).
        erasing: probability of random erasing (training presets only; see the module docstring).
        seed: seed of the pipeline's own random generator (albumentations ignores global seeds);
            ``None`` draws a fresh one. Forked DataLoader workers inherit the same generator state,
            so call :func:`reseed_in_worker` in each worker (e.g. from ``worker_init_fn``).

    Raises:
        DataError: an unknown preset, an invalid preprocessing config or ``erasing`` outside [0, 1].
    """
    key = _key(preprocessing)
    if preset not in get_args(Preset):
        raise DataError(f"preset must be one of {list(get_args(Preset))}, got {preset!r}")
    if not 0.0 <= erasing <= 1.0:
        raise DataError(f"erasing is a probability in [0, 1], got {erasing!r}; 0 disables random erasing")
    if not train or preset == "none":
        return _eval_compose(key)
    (height, width), _, _, interpolation, _, _ = key
    flag = INTERPOLATIONS[interpolation]
    steps: list[A.BasicTransform]
    if preset in ("flip", "shift"):
        steps = _resize_steps(key, shift=preset == "shift")
        if hflip is None or hflip:
            steps.append(A.HorizontalFlip(p=0.5))
    elif preset == "fashion":
        steps = [
            A.RandomResizedCrop(
                size=(height, width),
                scale=(0.6, 1.0),
                ratio=(3 / 4, 4 / 3),
                interpolation=flag,
                area_for_downscale="image",
            ),
        ]
        if hflip is None or hflip:
            steps.append(A.HorizontalFlip(p=0.5))
        steps.append(A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.15, hue=0.0, p=0.8))
    else:
        steps = [
            *_resize_steps(key),
            A.Affine(
                rotate=(-10, 10),
                scale=(0.9, 1.1),
                translate_percent=(-0.05, 0.05),
                interpolation=flag,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                p=0.7,
            ),
            _LuminanceCLAHE(clip_limit=2.0, tile_grid_size=(8, 8), p=0.5),
        ]
        if hflip:
            steps.append(A.HorizontalFlip(p=0.5))
    tail = _tail(key)
    if erasing > 0:  # on the normalised image, so the fill 0 is the mean colour (as torchvision's)
        tail.insert(1, A.Erasing(scale=(0.02, 0.25), ratio=(0.3, 3.3), fill=0, p=erasing))
    return A.Compose([*steps, *tail], seed=seed)


def reseed_in_worker(pipeline: A.Compose) -> None:
    """Give the current DataLoader worker its own augmentation stream.

    albumentations 2 keeps a generator inside each ``Compose``; forked workers would otherwise
    all apply the same "random" augmentations. Seeds from ``torch.utils.data.get_worker_info()``,
    which differs per worker and per epoch (and follows ``torch.manual_seed``). A no-op outside
    a worker.
    """
    info = torch.utils.data.get_worker_info()
    if info is not None:
        pipeline.set_random_seed(int(info.seed % 2**32))


def preprocess_batch(images: Sequence[np.ndarray], preprocessing: PreprocessingLike) -> torch.Tensor:
    """Turn decoded images into a model input batch with exactly the evaluation pipeline.

    For query time: the same pixels as at indexing time. Arrays that are not ``(H, W, 3)`` uint8
    (grayscale, RGBA, uint16) are first converted by :func:`~deepfeat.finetune.data.images.load_image`.

    Returns:
        A ``(N, 3, H, W)`` float32 tensor (``N = 0`` gives an empty batch of the right shape).
    """
    key = _key(preprocessing)
    pipeline = _cached_eval_compose(key)
    tensors = []
    for image in images:
        rgb = image
        if not (
            isinstance(image, np.ndarray)
            and image.ndim == 3
            and image.shape[2] == 3
            and image.dtype == np.uint8
        ):
            rgb = load_image(image)
        tensors.append(pipeline(image=rgb)["image"])
    if not tensors:
        height, width = key[0]
        return torch.empty((0, 3, height, width), dtype=torch.float32)
    return torch.stack(tensors)
