"""``deepfeat dedup --threshold auto``: the threshold is calibrated on copies of the collection's own images
(JPEG re-encode, half size, brightness) against distinct images, so planted re-encodes are grouped and distinct
photos are not; a space that cannot tell copies from distinct images is reported as such."""

from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepfeat.connectors import connect, load_embeddings
from deepfeat.finetune.data.readers import read_records
from deepfeat.finetune.inference.embed import iter_embeddings
from deepfeat.finetune.models.bundle import ModelBundle, export_bundle
from deepfeat.finetune.models.model import EmbeddingModel, build_embedding_model
from deepfeat.recipes.cli import main
from deepfeat.recipes.dedup import augmented_copies, calibrate_from_images

skdata = pytest.importorskip("skimage.data")

#: distinct photos that scikit-image ships ('cat' is left out: it is 'chelsea' again)
PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "page", "text", "horse", "clock",
          "brick", "grass", "colorwheel", "hubble_deep_field", "immunohistochemistry")


def _photo(name: str, size: int = 160) -> np.ndarray:
    image = np.asarray(getattr(skdata, name)())
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    pil = Image.fromarray(image[..., :3].astype(np.uint8))
    pil.thumbnail((size, size))
    return np.asarray(pil.convert("RGB"))


def _jpeg(image: np.ndarray, quality: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def test_auto_threshold_groups_reencodes_and_keeps_distinct_photos_apart(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "images" / "photos"
    folder.mkdir(parents=True)
    photos = {name: _photo(name) for name in PHOTOS}
    for name, image in photos.items():
        Image.fromarray(image).save(folder / f"{name}.png")
    # near-duplicates made other ways than the calibration's own copies (quality 85, 70 % size, 1.1x + JPEG 90)
    (folder / "astronaut_q85.jpg").write_bytes(_jpeg(photos["astronaut"], 85))
    coffee = Image.fromarray(photos["coffee"])
    coffee.resize((coffee.width * 7 // 10, coffee.height * 7 // 10), Image.Resampling.LANCZOS).save(
        folder / "coffee_small.png")
    brighter = np.clip(photos["rocket"].astype(np.float32) * 1.1, 0, 255).astype(np.uint8)
    (folder / "rocket_bright.jpg").write_bytes(_jpeg(brighter, 90))
    planted = [["photos/astronaut.png", "photos/astronaut_q85.jpg"], ["photos/coffee.png", "photos/coffee_small.png"],
               ["photos/rocket.png", "photos/rocket_bright.jpg"]]

    # the off-the-shelf features: an instance-level space, as the docs advise for near-duplicates
    model = build_embedding_model("tf_efficientnet_lite0", "imagenet", head="none", image_size=96)
    bundle_dir = export_bundle(model, tmp_path / "bundle", torchscript=False, onnx=False)
    bundle = ModelBundle.load(bundle_dir)
    records = read_records(str(tmp_path / "images"))
    uri = str(tmp_path / "dedup.db")
    with connect(uri) as conn:
        load_embeddings(conn, "photos", iter_embeddings(bundle, records), bundle=bundle, progress=False)

    out = tmp_path / "groups.csv"
    assert main(["dedup", "--uri", uri, "--collection", "photos", "--bundle", str(bundle_dir),
                 "--calibration-images", "12", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "calibrated on 12 images" in printed and "does not separate" not in printed
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    groups: dict[str, list[str]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row["record_id"])
    assert sorted(sorted(g) for g in groups.values()) == sorted(planted)


def test_auto_threshold_needs_the_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dedup", "--uri", str(tmp_path / "x.db"), "--collection", "c"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--bundle" in err and "--threshold" in err and "\n" not in err


def test_a_space_that_scores_distinct_images_like_copies_is_reported() -> None:
    photos = [_photo(name, size=64) for name in PHOTOS[:8]]
    # one dimension, L2-normalised: every vector is +1 or -1, so distinct images score like copies
    collapsed = build_embedding_model("test_efficientnet", "none", head="linear", embedding_dim=1, image_size=32)
    calibration = calibrate_from_images(_in_memory_bundle(collapsed), photos)
    assert not calibration.separated
    assert "does not separate copies from distinct images" in calibration.summary()
    assert calibration.copy_scores.size == 8 * len(augmented_copies(photos[0]))


def _in_memory_bundle(model: EmbeddingModel) -> ModelBundle:
    with tempfile.TemporaryDirectory() as tmp:
        return ModelBundle.load(export_bundle(model, Path(tmp) / "b", torchscript=False, onnx=False))
