"""The full-network embedding: statistics, discretisation, bundle round trip, storage conversions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deepfeat.finetune.errors import DataError, ModelError
from deepfeat.finetune.models.backbones import create_backbone
from deepfeat.finetune.models.bundle import ModelBundle, export_bundle
from deepfeat.finetune.models.fne import (
    DEFAULT_THRESHOLDS,
    FNEHead,
    RunningMoments,
    build_fne_model,
    fit_statistics,
    fit_statistics_from_records,
    fne_head,
    fne_storage_report,
    format_storage_report,
    from_presence_absence,
    layer_features,
    to_binary_code,
    to_int8,
    to_presence_absence,
)
from deepfeat.finetune.models.model import EmbeddingModel

SIZE = 32


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="module")
def fitted(images: torch.Tensor) -> EmbeddingModel:
    torch.manual_seed(0)
    model = build_fne_model(create_backbone("lite0", "none", image_size=SIZE)).eval()
    fit_statistics(model, images, batch_size=4)
    return model


def test_running_moments_match_numpy_in_any_batching() -> None:
    rng = np.random.default_rng(0)
    # A large mean and a small spread: the case where sum/sum-of-squares loses every digit in float32.
    x = (1e4 + rng.normal(0, 1e-2, size=(37, 5))).astype(np.float32)
    for sizes in ([37], [1, 36], [10, 10, 10, 7], [5] * 7 + [2]):
        moments = RunningMoments()
        start = 0
        for n in sizes:
            moments.update(x[start : start + n])
            start += n
        assert moments.count == 37
        np.testing.assert_allclose(moments.mean.numpy(), x.astype(np.float64).mean(0), rtol=1e-12)
        np.testing.assert_allclose(moments.std.numpy(), x.astype(np.float64).std(0), rtol=1e-8)


def test_statistics_equal_numpy_and_zero_variance_is_guarded() -> None:
    feats = torch.tensor([[1.0, 6.0, 0.0, 2.0], [3.0, 6.0, 0.0, -2.0], [5.0, 6.0, 0.0, 4.0]])
    head = FNEHead(4, discretize=False)
    stats = head.fit_features([feats[:2], feats[2:]])
    np.testing.assert_allclose(head.mean.numpy(), feats.numpy().mean(0), rtol=1e-6)
    expected_std = feats.numpy().std(0)
    expected_std[[1, 2]] = 0.0  # constant columns (a saturated ReLU6 and a dead unit)
    np.testing.assert_allclose(head.std.numpy(), expected_std, rtol=1e-6)
    assert stats.count == 3 and stats.n_zero_variance == 2
    z = head(torch.tensor([[3.0, 7.0, 5.0, 1.0]]))
    assert torch.isfinite(z).all()
    assert z[0, 1] == 0 and z[0, 2] == 0  # no division by a zero std, whatever the query's value
    np.testing.assert_allclose(z[0, [0, 3]].numpy(), [0.0, (1.0 - 4 / 3) / expected_std[3]], rtol=1e-5)


def test_thresholds_give_exactly_minus_one_zero_one() -> None:
    head = FNEHead(7)
    head.set_statistics(torch.zeros(7), torch.ones(7), count=100)  # z == x
    x = torch.tensor([[-3.0, -0.26, -0.25, 0.0, 0.15, 0.16, 9.0]])
    # strict inequalities, as in the paper: a value on a threshold stays 0
    assert head(x).tolist() == [[-1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 1.0]]
    out = head(torch.randn(500, 7) * 3)
    assert set(out.unique().tolist()) == {-1.0, 0.0, 1.0}
    head.set_options(thresholds=(-1.0, 2.0))
    assert head(x).tolist() == [[-1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]]
    head.set_options(discretize=False)
    assert torch.equal(head(x), x)


def test_head_refuses_bad_use() -> None:
    with pytest.raises(ModelError, match="no reference statistics"):
        FNEHead(3)(torch.zeros(2, 3))
    with pytest.raises(ModelError, match="t_neg <= t_pos"):
        FNEHead(3, thresholds=(0.5, -0.5))
    head = FNEHead(3)
    head.set_statistics(torch.zeros(3), torch.ones(3), count=2)
    with pytest.raises(ModelError, match=r"expects features \(N, 3\)"):
        head(torch.zeros(2, 4))
    with pytest.raises(ModelError, match="do not fit"):
        head.set_statistics(torch.zeros(4), torch.ones(4), count=2)


def test_one_forward_pass_gives_every_layer(fitted: EmbeddingModel, images: torch.Tensor) -> None:
    bb = fitted.backbone
    assert bb.layers is not None and bb.layers[-1] == "head" and len(bb.layers) > 2
    with torch.no_grad():
        parts = layer_features(bb, images[:3])
        assert [p.shape[1] for p in parts] == bb.layer_channels
        torch.testing.assert_close(torch.cat(parts, dim=1), bb(images[:3]))


def test_fit_statistics_streams_the_backbone_features(fitted: EmbeddingModel, images: torch.Tensor) -> None:
    with torch.no_grad():
        feats = fitted.backbone(images).double().numpy()
    head = fne_head(fitted)
    assert int(head.count) == len(images)
    np.testing.assert_allclose(head.mean.numpy(), feats.mean(0), rtol=1e-5, atol=1e-6)
    std = feats.std(0)
    live = head.std.numpy() > 0
    np.testing.assert_allclose(head.std.numpy()[live], std[live], rtol=1e-4, atol=1e-6)
    assert (std[~live] <= 1e-6 * np.maximum(1.0, np.abs(feats.mean(0)[~live]))).all()
    loader = [{"image": images[:4]}, {"image": None}, {"image": images[4:]}]  # like a deepfeat loader
    fit_statistics(fitted, loader)
    np.testing.assert_allclose(head.mean.numpy(), feats.mean(0), rtol=1e-5, atol=1e-6)


def test_fit_statistics_from_records_uses_the_eval_preprocessing(fitted: EmbeddingModel) -> None:
    import pandas as pd

    from deepfeat.finetune.data.readers import read_records
    from deepfeat.finetune.data.transforms import preprocess_batch

    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8) for _ in range(5)]
    records = read_records(pd.DataFrame({"id": [f"r{i}" for i in range(5)], "image": arrays, "label": "a"}))
    model = EmbeddingModel(fitted.backbone, head="fne").eval()
    stats = fit_statistics_from_records(model, records, batch_size=2)
    assert stats.count == 5
    expected = EmbeddingModel(fitted.backbone, head="fne").eval()
    fit_statistics(expected, preprocess_batch(arrays, fitted.preprocessing))
    torch.testing.assert_close(fne_head(model).mean, fne_head(expected).mean)
    torch.testing.assert_close(fne_head(model).std, fne_head(expected).std)


def test_bundle_round_trip_keeps_the_statistics(
    tmp_path: Path, fitted: EmbeddingModel, images: torch.Tensor
) -> None:
    with torch.no_grad():
        ref = fitted(images).numpy()
    codes = to_int8(ref)
    assert set(np.unique(codes).tolist()) <= {-1, 0, 1}
    np.testing.assert_allclose(np.linalg.norm(ref, axis=1), 1.0, rtol=1e-5)
    path = export_bundle(fitted, tmp_path / "fne", onnx=False, torchscript=False)
    card = json.loads((path / "card.json").read_text())
    assert card["metric"] == "COSINE" and card["embedding_dim"] == fitted.embedding_dim
    assert card["model_config"]["head"] == "fne"
    assert card["model_config"]["head_options"]["discretize"] is True
    loaded = ModelBundle.load(path)
    np.testing.assert_array_equal(loaded.embed_tensor(images), ref)
    assert torch.equal(fne_head(loaded.model).std, fne_head(fitted).std)
    # other thresholds are other weights: the bundle id changes, so a collection refuses the mix
    other = build_fne_model(fitted.backbone, thresholds=(-0.5, 0.5)).eval()
    fne_head(other).set_statistics(fne_head(fitted).mean, fne_head(fitted).std, 6)
    other_path = export_bundle(other, tmp_path / "other", onnx=False, torchscript=False)
    assert json.loads((other_path / "card.json").read_text())["bundle_id"] != card["bundle_id"]


def test_unfitted_model_is_refused(images: torch.Tensor, fitted: EmbeddingModel) -> None:
    model = EmbeddingModel(fitted.backbone, head="fne").eval()  # same layers, no statistics
    with pytest.raises(ModelError, match="fit_statistics"):
        model(images[:1])
    with pytest.raises(ModelError, match="not a full-network embedding"):
        fne_head(EmbeddingModel(fitted.backbone, head="none"))


def test_storage_report_and_conversions() -> None:
    report = fne_storage_report(2096)
    assert report["float32"].bytes_per_vector == 8384 and report["float32"].milvus_lite
    assert report["int8"].bytes_per_vector == 2096 and report["int8"].metrics == ("COSINE",)
    assert report["binary"].bytes_per_vector == 2 * 262 and "HAMMING" in report["binary"].metrics
    assert fne_storage_report(13)["binary"].field_dim == 16
    assert "INT8_VECTOR" in format_storage_report(2096, 1000)

    rng = np.random.default_rng(0)
    codes = rng.integers(-1, 2, size=(20, 13)).astype(np.float32)
    codes[0] = 0  # an all-zero code is valid
    normalised = codes / np.maximum(np.linalg.norm(codes, axis=1, keepdims=True), 1e-12)
    np.testing.assert_array_equal(to_int8(normalised), codes.astype(np.int8))
    presence, absence = to_presence_absence(normalised)
    assert presence.shape == (20, 2) and presence.dtype == np.uint8
    np.testing.assert_array_equal(from_presence_absence(presence, absence, 13), codes.astype(np.int8))
    # HAMMING between the presence|absence bits is the L1 distance between the ternary codes
    bits = np.unpackbits(to_binary_code(codes), axis=1)
    hamming = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    l1 = np.abs(codes[:, None, :] - codes[None, :, :]).sum(-1)
    np.testing.assert_array_equal(hamming, l1)
    with pytest.raises(DataError, match="not a discretised"):
        to_int8(rng.normal(size=(3, 8)))


def test_fne_vectors_search_in_milvus_lite(
    tmp_path: Path, fitted: EmbeddingModel, images: torch.Tensor
) -> None:
    pymilvus = pytest.importorskip("pymilvus", reason="pymilvus is needed for the Milvus Lite check")
    with torch.no_grad():
        vectors = fitted(images).numpy()
    client = pymilvus.MilvusClient(str(tmp_path / "fne.db"))
    try:
        schema = client.create_schema(auto_id=False)
        schema.add_field("id", pymilvus.DataType.INT64, is_primary=True)
        schema.add_field("vector", pymilvus.DataType.FLOAT_VECTOR, dim=vectors.shape[1])
        index = client.prepare_index_params()
        index.add_index("vector", index_type="FLAT", metric_type="COSINE")
        client.create_collection("fne", schema=schema, index_params=index)
        client.insert("fne", [{"id": i, "vector": v.tolist()} for i, v in enumerate(vectors)])
        hits = client.search("fne", data=[vectors[3].tolist()], limit=3, anns_field="vector")[0]
    finally:
        client.close()
    cosine = vectors @ vectors[3]
    assert hits[0]["id"] == 3
    for hit in hits:
        assert hit["distance"] == pytest.approx(float(cosine[hit["id"]]), abs=1e-5)
    assert [h["distance"] for h in hits] == pytest.approx(sorted(cosine, reverse=True)[:3], abs=1e-5)


def test_default_thresholds_are_the_papers() -> None:
    assert DEFAULT_THRESHOLDS == (-0.25, 0.15)
    assert FNEHead(4).options() == {"thresholds": [-0.25, 0.15], "discretize": True}


def test_heads_live_in_one_module_and_fne_re_exports_them() -> None:
    """model.py builds heads from heads.py; fne.py builds on model.py; neither imports the other back."""
    import ast

    from deepfeat.finetune.models import fne, heads, model

    def imported(module: object) -> set[str]:
        tree = ast.parse(Path(str(getattr(module, "__file__", ""))).read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    assert "deepfeat.finetune.models.fne" not in imported(model) and "deepfeat.finetune.models.model" in imported(fne)
    assert "deepfeat.finetune.models.model" not in imported(heads)
    assert fne.FNEHead is heads.FNEHead and fne.DEFAULT_THRESHOLDS == heads.DEFAULT_THRESHOLDS
    lin, dim = heads.build_head("linear", 8, 4)
    assert dim == 4 and isinstance(lin, torch.nn.Linear)
    torch.testing.assert_close(lin.weight @ lin.weight.T, torch.eye(4))  # orthogonal rows: distances kept
    with pytest.raises(ModelError, match=r"head='fne' keeps the backbone's 8 features, but embedding_dim=4"):
        heads.build_head("fne", 8, 4)
    with pytest.raises(ModelError, match="they belong to head='fne'"):
        heads.build_head("mlp", 8, options={"thresholds": [0, 1]})
    with pytest.raises(ModelError, match="unknown head 'conv'"):
        heads.build_head("conv", 8)  # type: ignore[arg-type]
