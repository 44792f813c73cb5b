"""Model bundles: export then reload gives identical embeddings; ONNX and TorchScript agree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deepfeat.finetune.errors import MismatchError, ModelError
from deepfeat.finetune.models.bundle import ModelBundle, check_compatible, export_bundle
from deepfeat.finetune.models.model import EmbeddingModel, build_embedding_model


@pytest.fixture(scope="module")
def model() -> EmbeddingModel:
    torch.manual_seed(0)
    m = build_embedding_model("lite0", weights="imagenet", embedding_dim=32, image_size=48)
    with torch.no_grad():  # move the head away from its initialisation so a reload really is tested
        m.head.weight.add_(0.01 * torch.randn_like(m.head.weight))  # type: ignore[union-attr, operator]
    return m.eval()


def test_export_reload_identical(tmp_path: Path, model: EmbeddingModel) -> None:
    path = export_bundle(model, tmp_path / "b", name="t", metrics={"recall_at_1": 0.5},
                         training={"milvus_token": "secret"})
    card = json.loads((path / "card.json").read_text())
    assert card["embedding_dim"] == 32 and card["metric"] == "COSINE"
    assert card["preprocessing"]["input_size"] == [48, 48]
    assert "secret" not in (path / "card.json").read_text()
    bundle = ModelBundle.load(path)
    x = torch.rand(4, 3, 48, 48)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(bundle.embed_tensor(x), ref, atol=1e-5)
    # ONNX and TorchScript give the same vectors
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path / "model.onnx"))
    np.testing.assert_allclose(sess.run(None, {"images": x.numpy()})[0], ref, atol=1e-4)
    ts = torch.jit.load(str(path / "model.ts"))
    np.testing.assert_allclose(ts(x).detach().numpy(), ref, atol=1e-5)


def test_tampered_weights_and_missing_bundle_are_refused(tmp_path: Path, model: EmbeddingModel) -> None:
    path = export_bundle(model, tmp_path / "b", onnx=False, torchscript=False)
    state = torch.load(path / "model.pt", weights_only=True)
    state["head.bias"] += 1
    torch.save(state, path / "model.pt")
    with pytest.raises(ModelError, match="hash"):
        ModelBundle.load(path)
    with pytest.raises(ModelError, match="not a deepfeat model bundle"):
        ModelBundle.load(tmp_path)
    with pytest.raises(ModelError, match="already exists"):
        export_bundle(model, path)


def test_fingerprint_mismatch_is_explained(tmp_path: Path, model: EmbeddingModel) -> None:
    a = ModelBundle.load(export_bundle(model, tmp_path / "a", onnx=False, torchscript=False))
    other = build_embedding_model("lite0", weights="none", embedding_dim=16, image_size=48)
    b = ModelBundle.load(export_bundle(other, tmp_path / "b", onnx=False, torchscript=False))
    check_compatible(a.fingerprint(), a.fingerprint(), what="same")
    with pytest.raises(MismatchError, match="embedding_dim: 32 != 16"):
        check_compatible(a.fingerprint(), b.fingerprint(), what="collection 'x'")
    with pytest.raises(MismatchError, match="preprocessing"):
        x = torch.rand(1, 3, 64, 64)
        a.embed_tensor(x)


def test_flip_tta_mirror_invariant_and_changes_the_bundle_id(tmp_path: Path, model: EmbeddingModel) -> None:
    import copy

    tta = copy.deepcopy(model)
    tta.set_flip_tta(True)
    x = torch.rand(3, 3, 48, 48)
    mirrored = torch.flip(x, dims=[3])
    with torch.no_grad():
        plain, plain_m = model(x), model(mirrored)
        both, both_m = tta(x), tta(mirrored)
    assert not torch.allclose(plain, plain_m, atol=1e-3)  # the model itself is not mirror-invariant
    torch.testing.assert_close(both, both_m, atol=1e-5, rtol=0)
    # the average of the two normalised views, normalised
    torch.testing.assert_close(both, torch.nn.functional.normalize(plain + plain_m, dim=1), atol=1e-5, rtol=0)
    # training never mirrors (augmentation is the data pipeline's job); copies, as a train-mode pass moves
    # the BatchNorm statistics
    with torch.no_grad():
        torch.testing.assert_close(copy.deepcopy(tta).train()(x), copy.deepcopy(model).train()(x))
    a = export_bundle(model, tmp_path / "a", name="m", onnx=False, torchscript=False)
    b = export_bundle(tta, tmp_path / "b", name="m")
    card_a, card_b = (json.loads((p / "card.json").read_text()) for p in (a, b))
    assert card_b["model_config"]["flip_tta"] is True and "flip_tta" not in card_a["model_config"]
    with pytest.raises(MismatchError, match="bundle_id"):  # a collection filled without it refuses it
        check_compatible({"bundle_id": card_a["bundle_id"]}, {"bundle_id": card_b["bundle_id"]}, what="c")
    reloaded = ModelBundle.load(b)
    assert reloaded.model.flip_tta
    np.testing.assert_allclose(reloaded.embed_tensor(x), both.numpy(), atol=1e-5)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(b / "model.onnx"))
    np.testing.assert_allclose(sess.run(None, {"images": x.numpy()})[0], both.numpy(), atol=1e-4)
    ts = torch.jit.load(str(b / "model.ts"))
    np.testing.assert_allclose(ts(x).detach().numpy(), both.numpy(), atol=1e-5)
