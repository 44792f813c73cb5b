"""Shared test fixtures: tiny, real, learnable image data generated in ``tmp_path``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Fixtures shared by the test folders (helpers live in support/, fixtures are registered here).
from support.connectors import bundle, bundle_dir, conn, other_bundle_dir  # noqa: F401
from support.reliability import rel_bundle, rel_bundle_dir  # noqa: F401
from support.serve import serve_data  # noqa: F401

#: (name, RGB colour, pattern) of the classes in :func:`tiny_image_folder`.
TINY_CLASSES: tuple[tuple[str, tuple[int, int, int], str], ...] = (
    ("red_horizontal", (220, 40, 40), "horizontal"),
    ("green_vertical", (40, 200, 60), "vertical"),
    ("blue_diagonal", (50, 70, 220), "diagonal"),
    ("yellow_antidiagonal", (230, 210, 40), "antidiagonal"),
    ("magenta_checker", (210, 50, 200), "checker"),
    ("cyan_rings", (40, 200, 210), "rings"),
)
TINY_IMAGES_PER_CLASS = 8
TINY_SIZE = 32


def make_pattern_image(
    colour: tuple[int, int, int], pattern: str, rng: np.random.Generator, size: int = TINY_SIZE
) -> np.ndarray:
    """A (size, size, 3) uint8 image: coloured stripes of one orientation on a dark ground, plus noise.

    Colour and orientation are fixed per class; stripe period, phase, brightness and noise vary per
    image, so a model has to learn the class cues rather than memorise pixels.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    period = rng.uniform(5.0, 8.0)
    phase = rng.uniform(0.0, 2 * np.pi)
    coordinate = {
        "horizontal": yy,
        "vertical": xx,
        "diagonal": (xx + yy) / np.sqrt(2),
        "antidiagonal": (xx - yy) / np.sqrt(2),
        "rings": np.hypot(xx - size / 2, yy - size / 2),
    }
    if pattern == "checker":
        wave = np.sin(2 * np.pi * xx / period + phase) * np.sin(2 * np.pi * yy / period + phase)
    else:
        wave = np.sin(2 * np.pi * coordinate[pattern] / period + phase)
    stripes = (wave > 0).astype(np.float64)
    brightness = rng.uniform(0.75, 1.0)
    base = np.asarray(colour, dtype=np.float64) * brightness
    image = stripes[:, :, None] * base + (1 - stripes[:, :, None]) * base * 0.15
    image += rng.normal(0.0, 12.0, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


@pytest.fixture
def tiny_image_folder(tmp_path: Path) -> Path:
    """A class-per-sub-folder tree: 6 classes x 8 images of 32 x 32 px, PNG and JPEG mixed.

    Classes differ in colour and stripe orientation (see :data:`TINY_CLASSES`), so a small model can
    learn them. Returns the root folder ``tmp_path / "images"``.
    """
    root = tmp_path / "images"
    rng = np.random.default_rng(1234)
    for name, colour, pattern in TINY_CLASSES:
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(TINY_IMAGES_PER_CLASS):
            pixels = make_pattern_image(colour, pattern, rng)
            if i % 2:
                Image.fromarray(pixels).save(folder / f"{i:02d}.jpg", quality=95)
            else:
                Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return root
