"""EmbeddingModel: backbone + optional projection head + L2 normalisation, a plain ``nn.Module``."""

from __future__ import annotations

import logging
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from deepfeat.finetune.errors import ModelError
from deepfeat.finetune.models.backbones import Backbone, Preprocessing, create_backbone
from deepfeat.finetune.models.heads import HeadType, build_head

log = logging.getLogger(__name__)

__all__ = ["EmbeddingModel", "HeadType", "build_embedding_model"]


class EmbeddingModel(nn.Module):
    """Images to L2-normalised embeddings.

    The head starts close to the identity of the pretrained geometry: a square linear head is
    initialised to the identity, a narrower one to a random orthogonal projection (which preserves
    distances up to a scale), so step zero of fine-tuning retrieves like the off-the-shelf features
    (see :meth:`init_head_pca` for a data-driven start).

    Args:
        backbone: the feature extractor.
        head: ``none`` (the pooled features themselves), ``linear``, ``mlp`` (Linear-BN-ReLU-Linear), or
            ``fne`` (the full-network embedding: standardised, discretised features, see
            :mod:`deepfeat.finetune.models.fne`); built by :func:`deepfeat.finetune.models.heads.build_head`.
        embedding_dim: output size of the head; ``None`` keeps the backbone's size.
        normalize: L2-normalise the output (cosine similarity == inner product).
        head_options: keyword arguments of the head (``fne``: ``thresholds``, ``discretize``).
        flip_tta: in eval mode, embed each image and its left-right mirror and average the two
            (test-time augmentation): about twice the inference cost for a steadier embedding. Only for
            domains where a mirrored image means the same thing (clothes, products; not text, not scans
            with a laterality). It is part of what a bundle stores, and changes its ``bundle_id``, so a
            collection filled without it refuses queries embedded with it.

    A learned whitening (:meth:`set_whitening`, fitted by :mod:`deepfeat.finetune.training.whiten`) may follow the
    normalised output: a fixed linear map, then the normalisation again.
    """

    def __init__(self, backbone: Backbone, head: HeadType = "linear", embedding_dim: int | None = None,
                 normalize: bool = True, head_options: dict[str, Any] | None = None, flip_tta: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head_type: HeadType = head
        self.normalize = normalize
        self.head: nn.Module
        self.head, self.embedding_dim = build_head(head, backbone.num_features, embedding_dim, head_options)
        if flip_tta:
            self.set_flip_tta(True)

    def set_whitening(self, mean: torch.Tensor | None, matrix: torch.Tensor | None) -> None:
        """Apply ``(z - mean) @ matrix.T`` to the output ``z`` (then normalise again); ``None`` removes it.

        Both are buffers, so they are saved in the state dict and change the bundle id.

        Raises:
            ModelError: the shapes are not ``(embedding_dim,)`` and ``(embedding_dim, embedding_dim)``.
        """
        if mean is None or matrix is None:
            for name in ("whiten_mean", "whiten_matrix"):
                self._buffers.pop(name, None)
            return
        d = self.embedding_dim
        if tuple(mean.shape) != (d,) or tuple(matrix.shape) != (d, d):
            raise ModelError(f"a whitening for this model needs a mean of shape ({d},) and a matrix of shape "
                             f"({d}, {d}); got {tuple(mean.shape)} and {tuple(matrix.shape)}")
        device = next(self.parameters()).device
        self.register_buffer("whiten_mean", mean.detach().float().to(device).clone())
        self.register_buffer("whiten_matrix", matrix.detach().float().to(device).clone())

    @property
    def whitened(self) -> bool:
        """Whether a learned whitening follows the output (its buffers are the one record of it)."""
        return "whiten_matrix" in self._buffers

    @property
    def flip_tta(self) -> bool:
        """Whether flip test-time augmentation is on (its marker buffer is the one record of it)."""
        return "flip_tta_marker" in self._buffers

    def set_flip_tta(self, enabled: bool) -> None:
        """Turn flip test-time augmentation on or off (see the class docstring).

        When on, a buffer marks it in the state dict, so the weights digest, and with it the bundle id,
        differ from the same weights without it.
        """
        if enabled and "flip_tta_marker" not in self._buffers:
            self.register_buffer("flip_tta_marker", torch.ones(1))
        elif not enabled and "flip_tta_marker" in self._buffers:
            del self._buffers["flip_tta_marker"]

    @property
    def preprocessing(self) -> Preprocessing:
        """The preprocessing the backbone expects (stored in bundles, checked at query time)."""
        return self.backbone.preprocessing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (N, 3, H, W) to embeddings (N, embedding_dim)."""
        if self.flip_tta and not self.training:
            n = x.shape[0]
            both = self.head(self.backbone(torch.cat([x, torch.flip(x, dims=[3])])))
            if self.normalize:
                both = F.normalize(both, dim=1)
            z = both[:n] + both[n:]
        else:
            z = self.head(self.backbone(x))
        if self.normalize:
            z = F.normalize(z, dim=1)
        if self.whitened:
            mean, matrix = cast(torch.Tensor, self.whiten_mean), cast(torch.Tensor, self.whiten_matrix)
            z = (z - mean) @ matrix.T
            if self.normalize:
                z = F.normalize(z, dim=1)
        return z

    @torch.no_grad()
    def init_head_pca(self, features: torch.Tensor) -> None:
        """Initialise a linear head to the PCA projection of ``features`` (N, num_features).

        Whitening is not applied, so the projection keeps the top principal directions of the
        pretrained feature space at their original scale: the best rank-d approximation of the
        pretrained cosine geometry.
        """
        if not isinstance(self.head, nn.Linear):
            raise ModelError(f"PCA initialisation needs head='linear', this model has head={self.head_type!r}")
        if features.shape[0] < self.embedding_dim:
            log.warning("PCA init with %d samples for %d dims: the remaining directions stay random",
                        features.shape[0], self.embedding_dim)
        feats = F.normalize(features.float(), dim=1)
        mean = feats.mean(0)
        _, _, v = torch.linalg.svd(feats - mean, full_matrices=False)
        k = min(self.embedding_dim, v.shape[0])
        w = self.head.weight.data
        w[:k] = v[:k]
        self.head.bias.data = -(w @ mean)

    def config(self) -> dict[str, Any]:
        """What is needed to rebuild this model without weights."""
        config: dict[str, Any] = {"backbone": self.backbone.config(), "head": self.head_type,
                                  "embedding_dim": self.embedding_dim, "normalize": self.normalize}
        if self.flip_tta:
            config["flip_tta"] = True
        if self.whitened:
            config["whiten"] = True
        options = getattr(self.head, "options", None)
        if callable(options):
            config["head_options"] = options()
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> EmbeddingModel:
        """Rebuild an (untrained) model from :meth:`config`; load a state dict afterwards."""
        bb = config["backbone"]
        pre = Preprocessing.from_dict(bb["preprocessing"])
        backbone = create_backbone(bb["name"], weights="none", layers=bb.get("layers"))
        backbone.preprocessing = pre
        model = cls(backbone, head=config["head"], embedding_dim=config["embedding_dim"],
                    normalize=config.get("normalize", True), head_options=config.get("head_options"),
                    flip_tta=bool(config.get("flip_tta", False)))
        if config.get("whiten"):  # placeholders of the right shapes; the state dict fills them
            d = model.embedding_dim
            model.set_whitening(torch.zeros(d), torch.eye(d))
        return model


def build_embedding_model(backbone: str = "tf_efficientnet_lite0", weights: str = "imagenet", *,
                          head: HeadType = "linear", embedding_dim: int | None = None,
                          layers: list[int | str] | None = None, image_size: int | None = None,
                          normalize: bool = True, drop_path_rate: float = 0.0) -> EmbeddingModel:
    """One call from names to a model (what the YAML configs use); ``drop_path_rate`` as in ``create_backbone``."""
    bb = create_backbone(backbone, weights, layers=layers, image_size=image_size,  # type: ignore[arg-type]
                         drop_path_rate=drop_path_rate)
    return EmbeddingModel(bb, head=head, embedding_dim=embedding_dim, normalize=normalize)
