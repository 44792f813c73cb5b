"""Model bundles: export then reload gives identical embeddings; ONNX and TorchScript agree."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from deepfeat.finetune.errors import MismatchError, ModelError
from deepfeat.finetune.models.bundle import ModelBundle, card_digest, check_compatible, export_bundle, read_card
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


def _edit_card(path: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    card = json.loads((path / "card.json").read_text())
    edit(card)
    (path / "card.json").write_text(json.dumps(card))


@pytest.fixture()
def plain_bundle(tmp_path: Path, model: EmbeddingModel) -> Path:
    return export_bundle(model, tmp_path / "b", onnx=False, torchscript=False)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: c.update(embedding_dim=64), "embedding_dim is 64"),
        (lambda c: c["preprocessing"].update(mean=[0.1, 0.2, 0.3]), r"preprocessing \['mean'\]"),
        (lambda c: c["preprocessing"].update(std=[1.0, 1.0, 1.0]), r"preprocessing \['std'\]"),
        (lambda c: c.update(metric="L2"), "metric 'L2'"),
        # both copies edited alike: only the card hash can tell
        (lambda c: [p.update(mean=[0.4, 0.4, 0.4]) for p in (c["preprocessing"],
                                                              c["model_config"]["backbone"]["preprocessing"])],
         "card_sha256"),
        (lambda c: c.update(bundle_id="other@000000000000"), "card_sha256"),
    ],
    ids=["dim", "mean", "std", "metric", "both-preprocessings", "bundle-id"],
)
def test_edited_card_is_refused_at_load_naming_the_field(
    plain_bundle: Path, edit: Callable[[dict[str, Any]], object], match: str
) -> None:
    ModelBundle.load(plain_bundle)  # the untouched bundle loads
    _edit_card(plain_bundle, edit)
    with pytest.raises(ModelError, match=match) as info:
        ModelBundle.load(plain_bundle)
    assert "Re-export the bundle" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ModelError, match=match):  # the connectors read cards through read_card
        read_card(plain_bundle)


def test_config_and_weights_that_disagree_are_refused(plain_bundle: Path) -> None:
    # a consistent card (hash recomputed) whose model_config asks for another head size than the weights hold
    def edit(c: dict[str, Any]) -> None:
        c["embedding_dim"] = c["model_config"]["embedding_dim"] = 16
        c["card_sha256"] = card_digest(c)

    _edit_card(plain_bundle, edit)
    with pytest.raises(ModelError, match="weights do not fit model_config"):
        ModelBundle.load(plain_bundle)


def test_card_lacking_keys_names_them(plain_bundle: Path) -> None:
    _edit_card(plain_bundle, lambda c: [c.pop(k) for k in ("metric", "preprocessing")])
    with pytest.raises(ModelError, match=r"lacks the key\(s\) \['metric', 'preprocessing'\]"):
        ModelBundle.load(plain_bundle)
    (plain_bundle / "card.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="not an object"):
        read_card(plain_bundle)
    (plain_bundle / "card.json").write_text('{"format_version": 1}')
    with pytest.raises(ModelError, match="format_version 1; this deepfeat reads 2"):
        read_card(plain_bundle)


def test_card_never_holds_a_password(tmp_path: Path, model: EmbeddingModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPFEAT_MILVUS_TOKEN", "root:tok3n-value")
    uris = ["http://root:pa@SECRETPART@127.0.0.1:1", "https://u:p:a/ss@host:19530/db?token=abcdef"]
    path = export_bundle(model, tmp_path / "s", onnx=False, torchscript=False,
                         training={"uri": uris[0], "args": [f"--uri={uris[1]}"], "note": "token root:tok3n-value"})
    text = (path / "card.json").read_text()
    for fragment in ("SECRETPART", "pa@", "p:a/ss", "abcdef", "tok3n"):
        assert fragment not in text, fragment
    card = json.loads(text)
    assert card["training"]["uri"] == "http://***@127.0.0.1:1"
    ModelBundle.load(path)  # sanitising happens before the hash: the card still verifies
