"""Backbones: offline Lite weights (every key matched, sensible ImageNet predictions), local files, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepfeat.finetune.errors import ModelError
from deepfeat.finetune.models.backbones import (
    Preprocessing,
    _load_state_dict_file,
    create_backbone,
    installed_weights_path,
    load_weights_into,
)


def test_lite0_reads_size_and_preprocessing_from_the_model() -> None:
    bb = create_backbone("lite0", weights="imagenet")
    assert bb.num_features == 1280
    assert bb.preprocessing.mean == (0.5, 0.5, 0.5) and bb.preprocessing.std == (0.5, 0.5, 0.5)
    assert bb.preprocessing.input_size == (224, 224)
    lite2 = create_backbone("tf_efficientnet_lite2", weights="imagenet")
    assert lite2.preprocessing.input_size == (260, 260)


def test_lite0_weights_map_every_key_and_predict_imagenet_classes() -> None:
    """The packaged state dict maps onto timm's tf_efficientnet_lite0 in full, classifier included."""
    import timm
    import timm.data
    from PIL import Image
    from skimage import data as skdata

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = _load_state_dict_file(installed_weights_path("lite0"))
    load_weights_into(model, state, "lite0", by_order=True)  # raises on any missing/extra/reshaped key
    model.eval()
    cfg = timm.data.resolve_model_data_config(model)
    tf = timm.data.create_transform(**cfg)
    with torch.no_grad():
        cat = model(tf(Image.fromarray(skdata.chelsea()))[None]).softmax(-1)[0]
        coffee = model(tf(Image.fromarray(skdata.coffee()))[None]).softmax(-1)[0]
    assert int(cat.argmax()) in range(281, 286)  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert int(coffee.argmax()) in (504, 967, 968)  # coffee mug / espresso / cup
    assert float(coffee.max()) > 0.5


def test_local_weights_file_round_trip(tmp_path: Path) -> None:
    a = create_backbone("test_resnet", weights="none")
    path = tmp_path / "w.pth"
    torch.save(a.model.state_dict(), path)
    b = create_backbone("test_resnet", weights=str(path))
    x = torch.rand(2, 3, 32, 32)
    a.eval(), b.eval()
    assert torch.allclose(a(x), b(x))


def test_missing_weights_file_says_how_to_supply_one(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="weights='none'"):
        create_backbone("test_resnet", weights=str(tmp_path / "nope.pth"))


def test_no_download_for_unknown_pretrained(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="never downloads"):
        create_backbone("resnet18", weights="imagenet")


@pytest.mark.parametrize("name", ["hf-hub:timm/resnet18.a1_in1k", "hf_hub:timm/resnet18.a1_in1k@main"])
def test_hub_names_are_refused_at_once_with_the_offline_fix(name: str) -> None:
    # timm would try the network (and retry for ~25 s) before failing; the refusal names the local-file fix
    with pytest.raises(ModelError) as exc:
        create_backbone(name, weights="none")
    message = str(exc.value)
    assert "never downloads" in message and "backbone='resnet18.a1_in1k'" in message
    assert "weights='/path/to/model.safetensors'" in message and "\n" not in message


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    other = create_backbone("test_efficientnet", weights="none")
    path = tmp_path / "other.pth"
    torch.save(other.model.state_dict(), path)
    with pytest.raises(ModelError, match="another architecture"):
        create_backbone("test_resnet", weights=str(path))


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "obj": Preprocessing()}, path)  # a non-tensor object
    with pytest.raises(ModelError, match="weights_only"):
        create_backbone("test_resnet", weights=str(path))


def test_intermediate_layers_are_pooled_and_concatenated() -> None:
    bb = create_backbone("test_efficientnet", weights="none", layers=[1, 2, "head"])
    x = torch.rand(2, 3, 64, 64)
    out = bb.eval()(x)
    assert out.shape == (2, bb.num_features)
    assert bb.num_features == sum(bb.layer_channels) and len(bb.layer_channels) == 3
    with pytest.raises(ModelError, match="does not exist"):
        create_backbone("test_efficientnet", weights="none", layers=[99])


def test_torchvision_backbone_reads_its_preprocessing() -> None:
    bb = create_backbone("tv:resnet18", weights="none")
    assert bb.num_features == 512
    assert bb.preprocessing.input_size == (224, 224)
    assert bb.preprocessing.mean == pytest.approx((0.485, 0.456, 0.406))


def test_image_size_override_keeps_normalisation() -> None:
    bb = create_backbone("lite0", weights="none", image_size=64)
    assert bb.preprocessing.input_size == (64, 64)
    assert bb.preprocessing.mean == (0.5, 0.5, 0.5)
    assert Preprocessing.from_dict(bb.preprocessing.to_dict()) == bb.preprocessing


def test_drop_path_is_random_in_training_and_off_in_eval() -> None:
    """Stochastic depth: two training forwards of one batch differ, eval forwards are equal and match a
    backbone built without it (same weights), so query-time embeddings do not depend on the option."""
    torch.manual_seed(0)
    bb = create_backbone("lite0", weights="imagenet", image_size=48, drop_path_rate=0.2)
    plain = create_backbone("lite0", weights="imagenet", image_size=48)
    x = torch.randn(4, 3, 48, 48)
    with torch.no_grad():
        bb.eval()
        plain.eval()
        assert torch.allclose(bb(x), plain(x), atol=1e-5)
        bb.train()  # BatchNorm uses the batch's statistics either way: only the dropped blocks differ
        assert not torch.allclose(bb(x), bb(x))
    with pytest.raises(ModelError, match=r"drop_path_rate must be in \[0, 1\), got 1.0"):
        create_backbone("lite0", weights="none", drop_path_rate=1.0)
    with pytest.raises(ModelError, match="timm backbones only"):
        create_backbone("tv:resnet18", weights="none", drop_path_rate=0.1)
