"""Tiny real image folders for tests: class-dependent colour and stripe orientation plus noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

_COLOURS = [(220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 200, 40), (200, 60, 200), (40, 200, 210),
            (120, 120, 120), (250, 140, 30)]


def class_image(cls: int, index: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """One HxWx3 uint8 image of class ``cls``: stripes at a class angle in a class colour, plus noise."""
    rng = np.random.default_rng(seed * 100_003 + cls * 1009 + index)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = np.pi * cls / 8.0
    freq = 2 * np.pi / (4 + (cls % 3) * 2)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = (np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase) > 0).astype(np.float32)
    colour = np.array(_COLOURS[cls % len(_COLOURS)], dtype=np.float32)
    img = stripes[..., None] * colour + (1 - stripes[..., None]) * (255 - colour) * 0.3
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image_folder(root: Path, n_classes: int = 4, per_class: int = 6, size: int = 32, seed: int = 0,
                      fmt: str = "png") -> Path:
    """Write ``root/class_XX/img_YY.png`` files and return ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for c in range(n_classes):
        folder = root / f"class_{c:02d}"
        folder.mkdir(exist_ok=True)
        for i in range(per_class):
            Image.fromarray(class_image(c, i, size, seed)).save(folder / f"img_{i:02d}.{fmt}")
    return root
