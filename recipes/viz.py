"""Pictures of results: each query beside its top-k hits, hits framed by correct / wrong label."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CORRECT = (46, 160, 67)
WRONG = (214, 39, 40)
NEUTRAL = (140, 140, 140)


def _thumb(image: np.ndarray, size: int, frame: tuple[int, int, int] | None, border: int = 4) -> np.ndarray:
    from PIL import Image

    pil = Image.fromarray(image).convert("RGB")
    pil.thumbnail((size - 2 * border, size - 2 * border), Image.Resampling.NEAREST if min(image.shape[:2]) < 64
                  else Image.Resampling.BILINEAR)
    if pil.size != (size - 2 * border, size - 2 * border):
        pil = pil.resize((size - 2 * border, size - 2 * border), Image.Resampling.NEAREST)
    tile = np.full((size, size, 3), 255, dtype=np.uint8)
    if frame is not None:
        tile[:, :] = frame
    tile[border:size - border, border:size - border] = np.asarray(pil)
    return tile


def save_figure(fig: Any, out: str | Path, *, title: str | None = None, dpi: int = 110,
                title_size: int = 9) -> Path:
    """Title, lay out, write ``fig`` as a PNG (creating the folder) and close it; return the path."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=title_size)
        # tight_layout leaves the suptitle out: keep a band for it, or it overlaps the first row's captions
        band = (2.2 * title_size / 72) / fig.get_figheight()
        fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - min(band, 0.5)))
    else:
        fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    log.info("wrote %s", path)
    return path


def result_grid(queries: Sequence[dict[str, Any]], out: str | Path, *, thumb: int = 96,
                title: str | None = None) -> Path:
    """Write a PNG grid: one row per query, the query image then its hits.

    Args:
        queries: each ``{"image": HxWx3 uint8, "label": str, "hits": [{"image": ..., "label": str,
            "score": float}, ...]}``; a hit is framed green when its label equals the query's, red otherwise. A
            query with ``"label": None`` (a photo from outside the catalogue: shop the look) frames its hits
            grey; ``"title"`` replaces the query's caption.
        out: the PNG path.
        thumb: tile size in pixels.
        title: optional title above the grid.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = len(queries)
    n_cols = 1 + max((len(q["hits"]) for q in queries), default=0)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.3 * n_cols, 1.45 * n_rows + (0.4 if title else 0)),
                             squeeze=False)
    for r, q in enumerate(queries):
        ax = axes[r][0]
        ax.imshow(_thumb(q["image"], thumb, NEUTRAL))
        ax.set_title(str(q.get("title") or f"query\n{q.get('label', '')}")[:28], fontsize=7, fontweight="bold")
        judged = q.get("label") is not None
        for c in range(1, n_cols):
            ax = axes[r][c]
            if c - 1 < len(q["hits"]):
                hit = q["hits"][c - 1]
                ok = not judged or str(hit.get("label")) == str(q.get("label"))
                ax.imshow(_thumb(hit["image"], thumb, (CORRECT if ok else WRONG) if judged else NEUTRAL))
                ax.set_title(f"{hit.get('label', '')}\n{hit.get('score', float('nan')):.3f}"[:28], fontsize=6,
                             color="black" if ok else "#d62728")
        for ax in axes[r]:
            ax.axis("off")
    return save_figure(fig, out, title=title)


def image_rows(rows: Sequence[dict[str, Any]], out: str | Path, *, thumb: int = 96, title: str | None = None) -> Path:
    """Write a PNG grid of labelled rows of images (clusters, duplicate groups): no correct/wrong framing.

    Args:
        rows: each ``{"title": str, "images": [HxWx3 uint8, ...], "captions": [str, ...]}`` (captions
            optional); the title is drawn left of the row.
        out: the PNG path.
        thumb: tile size in pixels.
        title: optional title above the grid.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = max(len(rows), 1)
    n_cols = max((len(r["images"]) for r in rows), default=1) or 1
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.3 * n_cols + 0.8, 1.4 * n_rows + (0.4 if title else 0)),
                             squeeze=False)
    for r, row in enumerate(rows):
        captions = list(row.get("captions") or [])
        for c in range(n_cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(row["images"]):
                ax.imshow(_thumb(row["images"][c], thumb, NEUTRAL, border=2))
                if c < len(captions):
                    ax.set_title(str(captions[c])[:20], fontsize=6)
        axes[r][0].text(-0.08, 0.5, str(row.get("title", ""))[:24], transform=axes[r][0].transAxes, fontsize=7,
                        fontweight="bold", ha="right", va="center")
    return save_figure(fig, out, title=title)
