"""Shared data of the ``deepfeat serve`` tests: a tiny real image folder, two tiny real bundles and two
collections filled by them in one Milvus Lite ``.db`` (a comparison in the same database).

``base`` holds every record, including one in-memory image (no file) and a class whose label needs
quoting in a filter; ``tuned`` (other weights) holds every record but the in-memory one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from deepfeat.connectors import connect, load_embeddings
from deepfeat.finetune.data.readers import read_records
from deepfeat.finetune.inference.embed import iter_embeddings
from deepfeat.finetune.models.bundle import ModelBundle, export_bundle
from deepfeat.finetune.models.model import build_embedding_model
from deepfeat.recipes.serve import PanelConfig
from support.imagegen import class_image, make_image_folder

#: A label with a quote, a backslash, markup and non-ASCII letters: filters must quote it, the page escape it.
TRICKY_LABEL = 'class "3" \\ <b>ünï</b>'
MEMORY_ID = "memory/0"
N_FILES = 24  # 4 classes x 6 images


@dataclass(frozen=True)
class ServeData:
    """What :func:`serve_data` built."""

    images: Path
    db: Path
    base_bundle: Path
    tuned_bundle: Path
    records: pd.DataFrame

    def base(self, label: str = "off-the-shelf") -> PanelConfig:
        """The panel over the ``base`` collection."""
        return PanelConfig(label, str(self.db), "base", self.base_bundle, self.images)

    def tuned(self, label: str = "fine-tuned") -> PanelConfig:
        """The panel over the ``tuned`` collection."""
        return PanelConfig(label, str(self.db), "tuned", self.tuned_bundle, self.images)

    def file_of(self, record_id: str) -> Path:
        """The image file of a record."""
        return Path(str(self.records.set_index("id").loc[record_id, "path"]))


def _bundle(path: Path, seed: int) -> Path:
    import torch

    torch.manual_seed(seed)
    model = build_embedding_model("tf_efficientnet_lite0", weights="none", image_size=32, embedding_dim=16)
    return export_bundle(model, path, onnx=False, torchscript=False)


@pytest.fixture(scope="session")
def serve_data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeData]:
    """Build the folder, the bundles and both collections once per session."""
    root = tmp_path_factory.mktemp("serve")
    images = make_image_folder(root / "images", n_classes=4, per_class=6, size=48)
    records = read_records(images)
    records["label"] = records["label"].replace({"class_03": TRICKY_LABEL})
    records["weight"] = np.arange(len(records), dtype=np.float64) / 2  # 0.0, 0.5, ... 11.5
    records["batch"] = np.arange(len(records), dtype=np.int64) % 3
    memory = {
        "id": MEMORY_ID,
        "path": None,
        "image": class_image(0, 99, size=48),
        "label": "class_00",
        "split": "train",
        "is_query": False,
        "is_gallery": False,
        "group": MEMORY_ID,
        "weight": 99.0,
        "batch": 0,
    }
    records = pd.concat([records, pd.DataFrame([memory])], ignore_index=True)
    base_bundle = _bundle(root / "bundles" / "base", seed=0)
    tuned_bundle = _bundle(root / "bundles" / "tuned", seed=1)
    db = root / "serve.db"
    conn = connect(str(db))
    try:
        for name, bundle_dir, rows in (
            ("base", base_bundle, records),
            ("tuned", tuned_bundle, records[records["id"] != MEMORY_ID]),
        ):
            bundle = ModelBundle.load(bundle_dir)
            report = load_embeddings(
                conn, name, iter_embeddings(bundle, rows, batch_size=32), bundle=bundle, progress=False
            )
            assert report.final_count == len(rows)
    finally:
        conn.release_lite()
    yield ServeData(images, db, base_bundle, tuned_bundle, records)
