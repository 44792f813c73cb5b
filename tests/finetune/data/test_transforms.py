"""deepfeat.finetune.data.transforms: eval semantics (timm parity), train presets, query batches."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from deepfeat.finetune.data.images import load_image
from deepfeat.finetune.data.transforms import (
    INTERPOLATIONS,
    PreprocessingLike,
    build_eval_transforms,
    build_transforms,
    preprocess_batch,
    reseed_in_worker,
)
from deepfeat.finetune.errors import DataError


@dataclass(frozen=True)
class Prep:
    """Stand-in for backbones.Preprocessing (same fields)."""

    input_size: tuple[int, int] = (32, 32)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    resize_mode: str = "shorter_side_crop"


def _run(pipeline: A.Compose, image: np.ndarray) -> torch.Tensor:
    out = pipeline(image=image)["image"]
    assert isinstance(out, torch.Tensor)
    return out


def _expected(pixels: np.ndarray, prep: Prep) -> torch.Tensor:
    mean = np.asarray(prep.mean, dtype=np.float32) * 255
    std = np.asarray(prep.std, dtype=np.float32) * 255
    return torch.from_numpy(((pixels.astype(np.float32) - mean) / std).transpose(2, 0, 1).copy())


def _random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_dataclass_satisfies_the_protocol() -> None:
    assert isinstance(Prep(), PreprocessingLike)


def test_shorter_side_crop_is_resize_then_centre_crop() -> None:
    image = _random_image(100, 200)
    prep = Prep(input_size=(50, 50), crop_pct=0.5, interpolation="nearest")
    # shorter side 100 == floor(50 / 0.5): no resize, then the centre 50 x 50
    out = _run(build_transforms(prep, preset="fashion", train=False), image)
    torch.testing.assert_close(out, _expected(image[25:75, 75:125], prep))


def test_shorter_side_crop_with_non_square_input_covers_the_target() -> None:
    image = _random_image(60, 60)
    prep = Prep(input_size=(30, 60), crop_pct=1.0, interpolation="nearest")
    out = _run(build_eval_transforms(prep), image)
    assert out.shape == (3, 30, 60)  # 60 x 60 already covers 30 x 60: only the crop
    torch.testing.assert_close(out, _expected(image[15:45], prep))


def test_squash_resizes_to_the_exact_size() -> None:
    image = np.zeros((64, 32, 3), dtype=np.uint8)
    image[:, 16:] = 255  # right half white
    prep = Prep(input_size=(16, 16), resize_mode="squash", crop_pct=0.5)  # crop_pct ignored
    out = _run(build_eval_transforms(prep), image)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert torch.all(out[:, :, :7] == -1.0) and torch.all(out[:, :, 9:] == 1.0)


def test_eval_matches_timm() -> None:
    timm_data = pytest.importorskip("timm.data")
    from PIL import Image

    yy, xx = np.mgrid[0:90, 0:120]
    smooth = np.stack([xx * 2, yy * 2, (xx + yy)], axis=2).clip(0, 255).astype(np.uint8)
    for resize_mode, crop_mode, crop_pct in (
        ("shorter_side_crop", "center", 0.875),
        ("squash", "squash", 1.0),
    ):
        prep = Prep(
            input_size=(48, 48),
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            crop_pct=crop_pct,
            resize_mode=resize_mode,
        )
        reference = timm_data.create_transform(
            input_size=(3, 48, 48),
            interpolation="bilinear",
            mean=prep.mean,
            std=prep.std,
            crop_pct=crop_pct,
            crop_mode=crop_mode,
        )(Image.fromarray(smooth))
        ours = _run(build_eval_transforms(prep), smooth)
        assert ours.shape == reference.shape
        assert (ours - reference).abs().mean() < 0.02, resize_mode  # ~1 grey level


def test_normalisation_uses_mean_and_std() -> None:
    prep = Prep(mean=(0.0, 0.5, 1.0), std=(1.0, 0.5, 0.25))
    out = _run(build_eval_transforms(prep), np.full((32, 32, 3), 255, dtype=np.uint8))
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([1.0, 1.0, 0.0]))


def test_interpolation_names_map_to_opencv_flags() -> None:
    assert INTERPOLATIONS == {
        "bilinear": cv2.INTER_LINEAR,
        "bicubic": cv2.INTER_CUBIC,
        "nearest": cv2.INTER_NEAREST,
    }
    pipeline = build_eval_transforms(Prep(interpolation="bicubic"))
    resize = pipeline.transforms[0]
    assert isinstance(resize, A.SmallestMaxSize) and resize.interpolation == cv2.INTER_CUBIC


@pytest.mark.parametrize("preset", ["fashion", "flip", "shift", "medical", "none"])
@pytest.mark.parametrize("train", [True, False])
def test_every_preset_gives_a_chw_float_tensor(tiny_image_folder: Path, preset: str, train: bool) -> None:
    image = load_image(next(tiny_image_folder.glob("*/00.png")))
    prep = Prep(input_size=(24, 40), crop_pct=0.9)
    out = _run(build_transforms(prep, preset=preset, train=train), image)  # type: ignore[arg-type]
    assert out.shape == (3, 24, 40) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_eval_and_none_preset_are_deterministic() -> None:
    image = _random_image(50, 70)
    for pipeline in (
        build_transforms(Prep(), preset="fashion", train=False),
        build_transforms(Prep(), preset="none", train=True),
    ):
        torch.testing.assert_close(_run(pipeline, image), _run(pipeline, image))


def test_train_augmentation_is_random_but_seedable() -> None:
    image = _random_image(50, 70)
    pipeline = build_transforms(Prep(), preset="fashion", train=True)
    outs = [_run(pipeline, image) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    first = [_run(build_transforms(Prep(), preset="fashion", train=True, seed=3), image) for _ in range(2)]
    torch.testing.assert_close(first[0], first[1])


def _types(pipeline: A.Compose) -> list[type]:
    return [type(t) for t in pipeline.transforms]


def test_fashion_preset_contents() -> None:
    pipeline = build_transforms(Prep(), preset="fashion", train=True)
    assert A.RandomResizedCrop in _types(pipeline) and A.HorizontalFlip in _types(pipeline)
    crop = next(t for t in pipeline.transforms if isinstance(t, A.RandomResizedCrop))
    assert tuple(crop.scale) == (0.6, 1.0)
    jitter = next(t for t in pipeline.transforms if isinstance(t, A.ColorJitter))
    assert tuple(jitter.hue) == (0.0, 0.0)  # colour is a product attribute
    assert A.HorizontalFlip not in _types(build_transforms(Prep(), preset="fashion", train=True, hflip=False))


@pytest.mark.parametrize("resize_mode", ["shorter_side_crop", "squash"])
def test_shift_preset_is_the_eval_image_moved_by_whole_pixels(resize_mode: str) -> None:
    """Each training view equals the evaluation view shifted by at most the margin, never rescaled."""
    image = _random_image(40, 40)
    prep = Prep(input_size=(48, 48), crop_pct=0.875, resize_mode=resize_mode)
    reference = _run(build_eval_transforms(prep), image)
    pipeline = build_transforms(prep, preset="shift", train=True, hflip=False, seed=0)
    shifts = set()
    for _ in range(12):
        out = _run(pipeline, image)
        found = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
                 if torch.equal(out[:, max(0, dy):48 + min(0, dy), max(0, dx):48 + min(0, dx)],
                                reference[:, max(0, -dy):48 + min(0, -dy), max(0, -dx):48 + min(0, -dx)])]
        assert len(found) >= 1, "a training view is not the evaluation view shifted by <= 3 px"
        shifts.add(found[0])
    assert len(shifts) > 1  # it does move
    assert A.HorizontalFlip in _types(build_transforms(prep, preset="shift", train=True))


def test_erasing_sets_a_rectangle_to_the_mean_and_leaves_the_rest() -> None:
    """Random erasing on a training view: one axis-aligned block of 2-25 % of the image becomes the
    normalised mean (0), every other pixel is the un-erased view's; off by default and never in eval."""
    image = np.full((32, 32, 3), 255, dtype=np.uint8)  # normalises to 1.0 everywhere
    prep = Prep(input_size=(32, 32))
    sizes = set()
    pipeline = build_transforms(prep, preset="flip", train=True, erasing=1.0, seed=0)
    for _ in range(8):
        out = _run(pipeline, image)
        erased = (out == 0).all(dim=0)
        assert torch.equal(out[:, ~erased], torch.ones(3, int((~erased).sum())))
        rows, cols = torch.where(erased)
        assert len(rows) > 0, "erasing=1.0 erased nothing"
        block = erased[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert block.all(), "the erased pixels are not one rectangle"
        assert 0.02 * 1024 * 0.5 <= len(rows) <= 0.25 * 1024 * 1.5
        sizes.add(len(rows))
    assert len(sizes) > 1  # the rectangle is random
    assert A.Erasing not in _types(build_transforms(prep, preset="flip", train=True))
    assert A.Erasing not in _types(build_transforms(prep, preset="flip", train=False, erasing=1.0))
    with pytest.raises(DataError, match=r"erasing is a probability in \[0, 1\], got 1.5"):
        build_transforms(prep, preset="flip", train=True, erasing=1.5)


def test_medical_preset_contents() -> None:
    pipeline = build_transforms(Prep(), preset="medical", train=True)
    names = _types(pipeline)
    assert A.Affine in names and A.ColorJitter not in names and A.HorizontalFlip not in names
    affine = next(t for t in pipeline.transforms if isinstance(t, A.Affine))
    assert tuple(affine.rotate) == (-10, 10)
    assert A.HorizontalFlip in _types(build_transforms(Prep(), preset="medical", train=True, hflip=True))


def test_medical_keeps_grayscale_gray() -> None:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, size=(40, 48), dtype=np.uint8)
    image = np.repeat(gray[:, :, None], 3, axis=2)
    pipeline = build_transforms(Prep(), preset="medical", train=True, seed=0)
    for _ in range(8):
        out = _run(pipeline, image)
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_medical_clahe_changes_contrast_of_gray_and_colour_images() -> None:
    from deepfeat.finetune.data.transforms import _LuminanceCLAHE

    clahe = _LuminanceCLAHE(clip_limit=4.0, p=1.0)
    low_contrast = (np.random.default_rng(1).integers(100, 120, size=(64, 64))).astype(np.uint8)
    gray = np.repeat(low_contrast[:, :, None], 3, axis=2)
    out = clahe(image=gray)["image"]
    assert out.shape == gray.shape and (out[..., 0] == out[..., 2]).all()
    assert out.std() > gray.std()
    colour = gray.copy()
    colour[..., 0] = 200
    out = clahe(image=colour)["image"]
    assert out.shape == colour.shape and out[..., 1].std() > colour[..., 1].std()


def test_invalid_configs_are_refused() -> None:
    with pytest.raises(DataError, match="interpolation"):
        build_eval_transforms(Prep(interpolation="lanczos"))
    with pytest.raises(DataError, match="resize_mode"):
        build_eval_transforms(Prep(resize_mode="border"))
    with pytest.raises(DataError, match="crop_pct"):
        build_eval_transforms(Prep(crop_pct=0.0))
    with pytest.raises(DataError, match="mean and std"):
        build_eval_transforms(Prep(mean=(0.5,)))  # type: ignore[arg-type]
    with pytest.raises(DataError, match="preset"):
        build_transforms(Prep(), preset="satellite", train=True)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="input_size"):
        build_eval_transforms(object())  # type: ignore[arg-type]


def test_preprocess_batch_is_the_eval_pipeline() -> None:
    prep = Prep(input_size=(24, 24), crop_pct=0.875)
    images = [_random_image(40, 60, seed=s) for s in range(3)]
    batch = preprocess_batch(images, prep)
    assert batch.shape == (3, 3, 24, 24) and batch.dtype == torch.float32
    pipeline = build_eval_transforms(prep)
    for i, image in enumerate(images):
        torch.testing.assert_close(batch[i], _run(pipeline, image))
    assert preprocess_batch([], prep).shape == (0, 3, 24, 24)


def test_preprocess_batch_converts_like_load_image() -> None:
    prep = Prep(input_size=(8, 8))
    gray16 = np.full((10, 10), 65535, dtype=np.uint16)
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    batch = preprocess_batch([gray16, rgba], prep)
    torch.testing.assert_close(batch, torch.ones(2, 3, 8, 8))  # white: 16-bit max, and transparent on white
    assert torch.equal(preprocess_batch([gray16], replace(prep))[0], batch[0])


def test_reseed_in_worker_is_a_no_op_in_the_main_process() -> None:
    pipeline = build_transforms(Prep(), preset="fashion", train=True, seed=5)
    reseed_in_worker(pipeline)
    assert pipeline.seed == 5
