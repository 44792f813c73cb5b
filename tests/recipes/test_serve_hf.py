"""The search page shows the pictures of records read from a Hugging Face ``save_to_disk`` folder (issue 21 item
5): such records have no file, only ``hf_dataset`` / ``hf_row`` / ``hf_column``; the page decodes the row's image and
serves it as PNG through the image route, and only from a dataset folder inside the panel's image root."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image
from support.imagegen import class_image

from deepfeat.connectors import connect, load_embeddings
from deepfeat.finetune.data.readers import read_records
from deepfeat.finetune.inference.embed import iter_embeddings
from deepfeat.finetune.models.bundle import ModelBundle, export_bundle
from deepfeat.finetune.models.model import build_embedding_model
from deepfeat.recipes.serve import PanelConfig, create_app, resolve_hf_dataset

pytest.importorskip("fastapi", reason='deepfeat serve needs the serve extra: pip install "deepfeat[serve]"')
from starlette.testclient import TestClient

BASE = "http://127.0.0.1"
SIZE = 40


@dataclass(frozen=True)
class HFData:
    root: Path  # the image root holding the dataset folder
    dataset: Path  # the DatasetDict's save_to_disk folder (splits train/ and test/ inside)
    db: Path
    bundle: Path
    pixels: dict[str, np.ndarray]  # record id -> the picture saved in the dataset

    def panel(self, image_root: Path | None = None) -> PanelConfig:
        return PanelConfig("hf", str(self.db), "hf", self.bundle, image_root or self.root)


@pytest.fixture(scope="module")
def hf_data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HFData]:
    """A real DatasetDict of PNG images saved with save_to_disk, read as records and loaded into Milvus Lite."""
    import torch

    tmp = tmp_path_factory.mktemp("serve_hf")
    root = tmp / "root"
    splits = {}
    for split, start in (("train", 0), ("test", 100)):
        images = [Image.fromarray(class_image(i % 3, start + i, size=SIZE)) for i in range(6)]
        splits[split] = datasets.Dataset.from_dict(
            {"image": images, "label": [i % 3 for i in range(6)]},
            features=datasets.Features({"image": datasets.Image(),
                                        "label": datasets.ClassLabel(names=["a", "b", "c"])}))
    folder = root / "catalogue"
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    records = read_records(folder)
    assert records["path"].isna().all() and records["hf_dataset"].notna().all()  # the case: no file, a way back
    pixels = {str(r.id): np.asarray(Image.open(io.BytesIO(r.image)).convert("RGB")) for r in records.itertuples()}
    torch.manual_seed(0)
    model = build_embedding_model("tf_efficientnet_lite0", weights="none", image_size=32, embedding_dim=16)
    bundle_dir = export_bundle(model, tmp / "bundle", onnx=False, torchscript=False)
    bundle = ModelBundle.load(bundle_dir)
    db = tmp / "hf.db"
    conn = connect(str(db))
    try:
        report = load_embeddings(conn, "hf", iter_embeddings(bundle, records, batch_size=16), bundle=bundle,
                                 progress=False)
        assert report.final_count == len(records) == 12
    finally:
        conn.release_lite()
    yield HFData(root, folder, db, bundle_dir, pixels)


def _decoded(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"))


def test_hits_of_a_saved_dataset_show_their_own_pictures(hf_data: HFData) -> None:
    with TestClient(create_app([hf_data.panel()]), base_url=BASE) as client:
        res = client.post("/api/search", json={"id": "hf-test-000002", "top_k": 12, "include_self": True})
        assert res.status_code == 200, res.text
        body = res.json()
        assert body["query"]["image"] is not None
        hits = body["panels"][0]["hits"]
        assert len(hits) == 12 and {h["record_id"] for h in hits} == set(hf_data.pixels)
        for hit in hits:
            assert hit["image"] == f"/api/image/0/{hit['pk']}"
            # the folder is shown relative to the image root, as paths are
            split = hit["record_id"].split("-")[1]
            assert hit["hf_dataset"] == f"catalogue/{split}" and hit["path"] == ""
            got = client.get(hit["image"], params={"size": 64})
            assert got.status_code == 200 and got.headers["content-type"] == "image/png"
            # PNG is lossless and the picture is smaller than the size asked: the very pixels saved in the dataset
            assert np.array_equal(_decoded(got.content), hf_data.pixels[hit["record_id"]])
        examples = client.get("/api/examples", params={"n": 4, "seed": 1}).json()
        assert len(examples) == 4 and all(e["image"] == f"/api/image/0/{e['pk']}" for e in examples)
        fields = {f["name"] for f in client.get("/api/info").json()["fields"]}
        assert "hf_dataset" not in fields and "path" not in fields  # locations are never offered as filters


def test_a_dataset_folder_outside_the_image_root_is_not_served(hf_data: HFData, tmp_path: Path) -> None:
    elsewhere = tmp_path / "other-root"
    elsewhere.mkdir()
    with TestClient(create_app([hf_data.panel(elsewhere)]), base_url=BASE) as client:
        hits = client.post("/api/search", json={"id": "hf-train-000000", "top_k": 3}).json()["panels"][0]["hits"]
        assert hits and all(h["image"] is None and h["hf_dataset"] == "" for h in hits)
        # asked for directly (a key not offered by the page), it is refused without naming where the dataset is
        res = client.get(f"/api/image/0/{hits[0]['pk']}")
        assert res.status_code == 404 and "outside the image root" in res.json()["detail"]
        assert str(hf_data.root) not in res.text and "catalogue" not in res.text


def test_the_folder_rule_follows_links_and_needs_a_saved_dataset(hf_data: HFData, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(hf_data.dataset / "train")  # a link inside the root to a dataset outside it
    (root / "plain").mkdir()
    assert resolve_hf_dataset(str(hf_data.dataset / "train"), hf_data.root) == (hf_data.dataset / "train").resolve()
    assert resolve_hf_dataset("catalogue/test", hf_data.root) == (hf_data.dataset / "test").resolve()
    for stored, reason in (("link", "outside the image root"), ("../root/../..", "outside the image root"),
                           ("plain", "not a save_to_disk folder"), ("", "no image file")):
        with pytest.raises(Exception, match=reason) as info:
            resolve_hf_dataset(stored, root)
        assert str(hf_data.dataset) not in str(info.value)
