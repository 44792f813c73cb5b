"""Pictures of results: Hugging Face hits get their pictures back, and a title never covers the first row."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from deepfeat.finetune.data.readers import HF_DATASET_COLUMN, HF_IMAGE_COLUMN, HF_ROW_COLUMN, read_records
from deepfeat.recipes.recipes import record_image
from deepfeat.recipes.viz import save_figure

matplotlib.use("Agg")


def _png(value: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_hit_from_a_saved_hf_dataset_gets_its_picture(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "hf"
    datasets.Dataset.from_dict(
        {"image": [{"bytes": _png(10 * i), "path": None} for i in range(5)], "label": [i % 2 for i in range(5)]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}),
    ).save_to_disk(str(folder))
    records = read_records(folder)
    row = records.iloc[3]
    # what a Milvus hit carries: scalar fields only, no path and no image bytes
    hit = {"record_id": row["id"], "label": row["label"], "path": "", HF_DATASET_COLUMN: row[HF_DATASET_COLUMN],
           HF_ROW_COLUMN: int(row[HF_ROW_COLUMN]), HF_IMAGE_COLUMN: row[HF_IMAGE_COLUMN]}
    picture = record_image(hit)
    assert picture is not None and picture.shape == (8, 8, 3) and int(picture[0, 0, 0]) == 30
    gone = dict(hit, **{HF_ROW_COLUMN: 99})
    assert record_image(gone) is None  # the dataset changed since: no picture (and a warning), not a crash


def test_the_title_keeps_clear_of_the_first_row(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    rows, cols = 12, 6  # the cluster picture at k=12
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols + 0.8, 1.4 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.imshow(np.zeros((8, 8, 3), dtype=np.uint8))
        ax.set_title("caption", fontsize=6)
        ax.axis("off")
    save_figure(fig, tmp_path / "grid.png", title="k-means, k=12: images nearest each centre")
    renderer = FigureCanvasAgg(fig).get_renderer()
    title = next(t for t in fig.findobj(matplotlib.text.Text) if t.get_text().startswith("k-means"))
    first_row_top = max(ax.title.get_window_extent(renderer).y1 for ax in axes[0])
    assert title.get_window_extent(renderer).y0 >= first_row_top
    assert (tmp_path / "grid.png").is_file()
