"""Projection heads of :class:`~deepfeat.finetune.models.model.EmbeddingModel`: ``none``, ``linear``, ``mlp``, and the
full-network embedding's :class:`FNEHead` (standardised, discretised features; the method and its
references are in :mod:`deepfeat.finetune.models.fne`).

:func:`build_head` makes the head a model config names; the FNE head keeps its statistics and thresholds
in buffers, so they travel in a bundle's weights and its hash.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from deepfeat.finetune.errors import DataError, ModelError

log = logging.getLogger(__name__)

HeadType = Literal["none", "linear", "mlp", "fne"]

#: The discretisation thresholds of Garcia-Gasulla et al. (2017): below -0.25 -> -1, above 0.15 -> 1.
DEFAULT_THRESHOLDS: tuple[float, float] = (-0.25, 0.15)

# A feature whose standard deviation on the reference set is at most this fraction of its mean's
# magnitude (or this absolute value) is constant up to float rounding: it is zeroed, not amplified.
_ZERO_VAR_RTOL = 1e-6
_ZERO_VAR_ATOL = 1e-12


# ----------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------
class RunningMoments:
    """Streaming per-feature mean and (population) standard deviation, in float64.

    Batches are merged with the pairwise update of Chan, Golub & LeVeque (1979), which stays accurate
    where the textbook ``sum(x^2)/n - mean^2`` cancels catastrophically (features with a large mean
    and a small spread, common after ReLU6 layers).
    """

    def __init__(self, num_features: int | None = None) -> None:
        self.count = 0
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None
        self.num_features = num_features

    def update(self, batch: torch.Tensor | np.ndarray) -> None:
        """Add a batch of feature vectors ``(n, num_features)``."""
        x = torch.as_tensor(batch).detach().to(device="cpu", dtype=torch.float64)
        if x.ndim != 2:
            raise DataError(f"feature batches must be 2-D (n, features); received shape {tuple(x.shape)}")
        if self.num_features is None:
            self.num_features = int(x.shape[1])
        if x.shape[1] != self.num_features:
            raise DataError(
                f"feature batch has {x.shape[1]} features but earlier batches had "
                f"{self.num_features}; feed features of one model only"
            )
        n_b = int(x.shape[0])
        if n_b == 0:
            return
        if not bool(torch.isfinite(x).all()):
            raise DataError("feature batch holds NaN or infinite values; check the images and the weights")
        mean_b = x.mean(dim=0)
        m2_b = ((x - mean_b) ** 2).sum(dim=0)
        if self._mean is None or self._m2 is None:
            self._mean, self._m2, self.count = mean_b, m2_b, n_b
            return
        n = self.count + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + delta**2 * (self.count * n_b / n)
        self.count = n

    @property
    def mean(self) -> torch.Tensor:
        """Per-feature mean (float64)."""
        if self._mean is None:
            raise DataError("no features were added; the reference set is empty")
        return self._mean

    @property
    def std(self) -> torch.Tensor:
        """Per-feature population standard deviation (``ddof=0``, float64)."""
        if self._m2 is None:
            raise DataError("no features were added; the reference set is empty")
        return (self._m2 / self.count).clamp_min(0.0).sqrt()


@dataclass(frozen=True)
class FNEStatistics:
    """What :func:`fit_statistics` measured."""

    count: int
    num_features: int
    n_zero_variance: int


# ----------------------------------------------------------------------------------------------------
# the head
# ----------------------------------------------------------------------------------------------------
class FNEHead(nn.Module):
    """Standardise features with reference statistics, then discretise them to {-1, 0, 1}.

    All state is in buffers (``mean``, ``std``, ``thresholds``, ``discretize``, ``count``), so it is
    saved in the state dict, hashed into the bundle id, and restored by ``load_state_dict``.
    ``std`` is 0 for features without variance on the reference set; those standardise to 0.

    Args:
        num_features: width of the incoming feature vector.
        thresholds: ``(t_neg, t_pos)`` with ``t_neg <= t_pos``; the paper's are ``(-0.25, 0.15)``.
        discretize: ``False`` gives the standardised features themselves (no thresholding).
    """

    mean: torch.Tensor
    std: torch.Tensor
    thresholds: torch.Tensor
    discretize: torch.Tensor
    count: torch.Tensor

    def __init__(
        self, num_features: int, *, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, discretize: bool = True
    ) -> None:
        super().__init__()
        if num_features < 1:
            raise ModelError(f"FNEHead needs at least one feature; received num_features={num_features}")
        lo, hi = check_thresholds(thresholds)
        self.num_features = int(num_features)
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))
        self.register_buffer("thresholds", torch.tensor([lo, hi], dtype=torch.float32))
        self.register_buffer("discretize", torch.tensor(bool(discretize)))
        self.register_buffer("count", torch.tensor(0, dtype=torch.int64))

    @property
    def fitted(self) -> bool:
        """Whether reference statistics have been set."""
        return int(self.count) > 0

    def options(self) -> dict[str, Any]:
        """The constructor options (stored in the model config, so a bundle can rebuild the head)."""
        # float32 buffers read back as 0.15000000596; 7 significant digits give the value that was set
        lo, hi = (float(f"{v:.7g}") for v in self.thresholds.tolist())
        return {"thresholds": [lo, hi], "discretize": bool(self.discretize)}

    def set_options(
        self, *, thresholds: Sequence[float] | None = None, discretize: bool | None = None
    ) -> None:
        """Change the thresholds or switch discretisation, keeping the statistics."""
        if thresholds is not None:
            self.thresholds.copy_(torch.tensor(check_thresholds(thresholds), dtype=torch.float32))
        if discretize is not None:
            self.discretize.fill_(bool(discretize))

    @torch.no_grad()
    def set_statistics(
        self, mean: torch.Tensor | np.ndarray, std: torch.Tensor | np.ndarray, count: int
    ) -> FNEStatistics:
        """Set the reference statistics; near-constant features get ``std = 0`` (they map to 0)."""
        m = torch.as_tensor(mean, dtype=torch.float64).flatten()
        s = torch.as_tensor(std, dtype=torch.float64).flatten()
        if m.numel() != self.num_features or s.numel() != self.num_features:
            raise ModelError(
                f"statistics of {m.numel()} / {s.numel()} features do not fit an FNE head of "
                f"{self.num_features}; fit them on the features of this model's backbone"
            )
        if count < 1:
            raise ModelError(f"statistics need a reference set of at least one image; received count={count}")
        if count < 2:
            log.warning("FNE statistics from a single image: every feature has zero variance")
        constant = s <= torch.maximum(m.abs() * _ZERO_VAR_RTOL, torch.full_like(s, _ZERO_VAR_ATOL))
        s = torch.where(constant, torch.zeros_like(s), s)
        self.mean.copy_(m.to(self.mean.dtype))
        self.std.copy_(s.to(self.std.dtype))
        self.count.fill_(int(count))
        n_zero = int(constant.sum())
        if n_zero:
            log.info(
                "%d of %d features have no variance on the reference set; they are set to 0",
                n_zero,
                self.num_features,
            )
        return FNEStatistics(count=int(count), num_features=self.num_features, n_zero_variance=n_zero)

    def fit_features(
        self, features: torch.Tensor | np.ndarray | Iterable[torch.Tensor | np.ndarray]
    ) -> FNEStatistics:
        """Set the statistics from reference features: one ``(n, D)`` array or an iterable of batches."""
        moments = RunningMoments(self.num_features)
        batches = [features] if isinstance(features, torch.Tensor | np.ndarray) else features
        for batch in batches:
            moments.update(batch)
        return self.set_statistics(moments.mean, moments.std, moments.count)

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` per feature; features with ``std == 0`` give 0."""
        std = self.std.to(x.dtype)
        inv = torch.where(std > 0, 1.0 / std.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(std))
        return (x - self.mean.to(x.dtype)) * inv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``(N, num_features)`` to ternary codes (or standardised features)."""
        if not torch.jit.is_tracing() and not torch.jit.is_scripting():
            if not self.fitted:
                raise ModelError(
                    "the full-network embedding has no reference statistics yet; call "
                    "deepfeat.finetune.models.fne.fit_statistics(model, reference_images) first"
                )
            if x.ndim != 2 or x.shape[1] != self.num_features:
                raise ModelError(
                    f"FNE head expects features (N, {self.num_features}); received {tuple(x.shape)}"
                )
        z = self.standardize(x)
        codes = (z > self.thresholds[1]).to(z.dtype) - (z < self.thresholds[0]).to(z.dtype)
        return torch.where(self.discretize, codes, z)

    def extra_repr(self) -> str:
        opts = self.options()
        return (
            f"num_features={self.num_features}, thresholds={tuple(opts['thresholds'])}, "
            f"discretize={opts['discretize']}, fitted={self.fitted}"
        )


# ----------------------------------------------------------------------------------------------------
# building a head
# ----------------------------------------------------------------------------------------------------
def init_geometry_preserving(lin: nn.Linear) -> None:
    """Start a linear head at the identity (square) or a random orthogonal projection (narrower or wider),
    so step zero of fine-tuning retrieves like the pretrained features (distances kept up to a scale)."""
    out_dim, in_dim = lin.weight.shape
    with torch.no_grad():
        if out_dim == in_dim:
            lin.weight.copy_(torch.eye(in_dim))
        else:
            nn.init.orthogonal_(lin.weight)
        lin.bias.zero_()


def build_head(
    head: HeadType, in_dim: int, embedding_dim: int | None = None, options: dict[str, Any] | None = None
) -> tuple[nn.Module, int]:
    """The head ``head`` over ``in_dim`` backbone features, and its output size.

    Args:
        head: ``none`` (the features themselves), ``linear`` (geometry-preserving start), ``mlp``
            (Linear-BN-ReLU-Linear) or ``fne`` (:class:`FNEHead`).
        embedding_dim: output size of ``linear``/``mlp`` (``None``: ``in_dim``); ``none`` and ``fne`` keep
            ``in_dim`` and refuse another size.
        options: keyword arguments of the FNE head (``thresholds``, ``discretize``); refused for the others.

    Raises:
        ModelError: an unknown head, options for a head that takes none, or a size the head cannot give.
    """
    if options and head != "fne":
        raise ModelError(f"head_options {sorted(options)} were given for head={head!r}, which takes "
                         f"none; they belong to head='fne'")
    if head in ("fne", "none") and embedding_dim not in (None, in_dim):
        fix = "leave embedding_dim unset" if head == "fne" else "use head='linear' to change the size"
        raise ModelError(f"head={head!r} keeps the backbone's {in_dim} features, but embedding_dim="
                         f"{embedding_dim} was asked for; {fix}")
    if head == "fne":
        return FNEHead(in_dim, **(options or {})), in_dim
    if head == "none":
        return nn.Identity(), in_dim
    out_dim = embedding_dim or in_dim
    if head == "linear":
        lin = nn.Linear(in_dim, out_dim)
        init_geometry_preserving(lin)
        return lin, out_dim
    if head == "mlp":
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.BatchNorm1d(in_dim), nn.ReLU(inplace=True),
                             nn.Linear(in_dim, out_dim)), out_dim
    raise ModelError(f"unknown head {head!r}; choose one of 'none', 'linear', 'mlp', 'fne'")


def check_thresholds(thresholds: Sequence[float]) -> tuple[float, float]:
    """``(t_neg, t_pos)`` as two finite floats with ``t_neg <= t_pos``.

    Raises:
        ModelError: not two numbers, not finite, or ``t_neg > t_pos``.
    """
    try:
        lo, hi = (float(v) for v in thresholds)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"thresholds must be two numbers (t_neg, t_pos); received {thresholds!r}") from exc
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ModelError(
            f"thresholds must be finite with t_neg <= t_pos; received ({lo}, {hi}). The paper "
            f"uses {DEFAULT_THRESHOLDS}"
        )
    return lo, hi


__all__ = [
    "DEFAULT_THRESHOLDS",
    "FNEHead",
    "FNEStatistics",
    "HeadType",
    "RunningMoments",
    "build_head",
    "check_thresholds",
    "init_geometry_preserving",
]
