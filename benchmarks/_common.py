"""Helpers shared by the benchmark scripts: timing, medians, goal marks, tables, test images, RSS.

Every figure a benchmark prints is a ratio against a baseline measured in the same run, with the
runs of the two sides alternated, so that a shared or throttled machine slows both alike.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> str:
    """``median (min-max)`` of repeated measurements, for tables."""
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def goal_mark(value: float, goal: float) -> str:
    """A check mark when ``value`` meets ``goal`` (a ratio), else a cross, with the goal."""
    return f"{'PASS' if value >= goal else 'MISS'} (goal >= {goal:g}x)"


def machine() -> str:
    """One line naming the machine and the software the figures came from."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (
        f"{os.cpu_count()} CPU cores ({cpu}){gpu}; torch {torch.__version__}, {torch.get_num_threads()} "
        f"intra-op threads; Python {platform.python_version()}; {_dt.date.today().isoformat()}"
    )


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (pastes into benchmarks/README.md as it is)."""
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (VmHWM), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Current resident set size of this process (VmRSS), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def photo_pool() -> list[np.ndarray]:
    """The colour photos bundled with scikit-image (no download), as (H, W, 3) uint8 arrays."""
    import skimage.data

    pool = []
    for name in (
        "astronaut",
        "coffee",
        "chelsea",
        "rocket",
        "hubble_deep_field",
        "immunohistochemistry",
        "colorwheel",
        "cat",
        "retina",
    ):
        try:
            image = np.asarray(getattr(skimage.data, name)())
        except Exception:  # a photo that would need a download: skip it
            continue
        if image.ndim == 3 and image.shape[2] == 3:
            pool.append(image)
    if not pool:
        raise SystemExit("scikit-image's bundled photos are missing; pip install scikit-image")
    return pool


def write_jpegs(folder: Path, n: int, size: int, *, seed: int = 0, quality: int = 90) -> list[Path]:
    """Write ``n`` real JPEG photos of ``size`` x ``size``: random crops (30-100 % of the shorter side),
    scales and flips of scikit-image's photos. Returns the paths in order."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = [Image.fromarray(p) for p in photo_pool()]
    paths = []
    for i in range(n):
        photo = pool[i % len(pool)]
        w, h = photo.size
        side = int(min(w, h) * rng.uniform(0.3, 1.0))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        tile = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = folder / f"img-{i:06d}.jpg"
        tile.save(path, quality=quality)
        paths.append(path)
    return paths


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished (reaped) children, e.g. DataLoader workers."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class Measure:
    """``items`` processed in ``wall`` seconds, using ``cpu`` CPU-seconds (this process and its children).

    Wall time is what the goals are about; CPU time moves much less when other jobs share the machine,
    so items per CPU-second is printed beside it as a check on noisy figures.
    """

    items: int
    wall: float
    cpu: float

    @property
    def rate(self) -> float:
        return self.items / max(self.wall, 1e-9)

    @property
    def cpu_rate(self) -> float:
        return self.items / max(self.cpu, 1e-9)


class Clock:
    """``with Clock() as c: ...`` then ``c.measure(items)``."""

    def __enter__(self) -> Clock:
        self._wall, self._cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self._wall, cpu_seconds() - self._cpu

    def measure(self, items: int) -> Measure:
        return Measure(items, self.wall, self.cpu)
