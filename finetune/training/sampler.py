"""P x K batch sampling for metric learning.

Each batch holds ``P`` classes with ``K`` images each, so every anchor has ``K - 1`` positives and
``(P - 1) * K`` negatives in the batch; the batch-hard triplet loss and most miners need exactly
this (Hermans, Beyer and Leibe, "In Defense of the Triplet Loss for Person Re-Identification",
2017, https://arxiv.org/abs/1703.07737).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Sampler

from deepfeat.finetune.errors import DataError

__all__ = ["EpochForwarder", "PKSampler"]

logger = logging.getLogger(__name__)


def _factorize(labels: Any) -> tuple[np.ndarray, list[Any]]:
    if isinstance(labels, torch.Tensor):
        values: Any = labels.detach().cpu().numpy()
    elif isinstance(labels, (pd.Series, pd.Index)):
        values = labels.to_numpy()
    else:
        # object dtype: np.asarray would turn [1, "1"] into two equal strings
        values = labels if isinstance(labels, np.ndarray) else np.asarray(list(labels), dtype=object)
    if values.ndim != 1:
        raise DataError(f"labels must be one-dimensional (one per image), got shape {tuple(values.shape)}")
    if values.dtype.kind not in "biuUS":
        values = np.asarray(list(values), dtype=object)
    codes, uniques = pd.factorize(values)
    if (codes < 0).any():
        raise DataError(f"{int((codes < 0).sum())} label(s) are missing (None/NaN); label every image")
    return np.asarray(codes, dtype=np.int64), list(uniques)


class EpochForwarder:
    """Passes ``set_epoch`` on to a batch sampler (see :attr:`PKSampler.sampler`)."""

    def __init__(self, owner: PKSampler) -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        """Select the owner's epoch."""
        self.owner.set_epoch(epoch)

    def __len__(self) -> int:
        return self.owner.num_samples


class PKSampler(Sampler[list[int]]):
    """Yield batches of ``p`` classes x ``k`` indices, for ``DataLoader(batch_sampler=...)``.

    * Classes are drawn uniformly without replacement within a batch. Inside a class, images are
      drawn from a shuffled cycle, so every image is used before any is repeated; a class with
      fewer than ``k`` images gives all of them plus random repeats (sampling with replacement).
    * Classes with fewer than 2 images cannot form a positive pair and are skipped (warned once).
    * The order depends only on ``seed`` and the epoch given to :meth:`set_epoch`, never on global
      random state. Lightning calls ``set_epoch`` every epoch on ``loader.sampler`` and on
      ``loader.batch_sampler.sampler``, not on the batch sampler itself, so :attr:`sampler` forwards it
      here (without it every epoch would repeat the first epoch's batches).
    * Distributed: all ranks draw the same global sequence of ``batches_per_epoch * num_replicas``
      batches and rank ``r`` takes batches ``r, r + num_replicas, ...``: disjoint batches, the same
      count on every rank. With Lightning, pass ``Trainer(use_distributed_sampler=False)`` so that it
      keeps this sampler instead of wrapping the dataset in a ``DistributedSampler``.

    Each batch lists its indices class by class (``k`` consecutive indices share a label).

    Args:
        labels: one label per dataset index (any hashable values, a numpy array or a tensor).
        p: classes per batch (at least 2: negatives come from other classes).
        k: images per class (at least 2: positives come from the same class).
        batches_per_epoch: batches per epoch *on each rank* (``len(sampler)``); default: enough for
            each usable image to be seen about once per epoch across ranks (at least 1).
        seed: base seed shared by all ranks.
        num_replicas: number of distributed processes; default: the world size of an initialised
            ``torch.distributed`` process group, else 1.
        rank: this process's rank; default: from ``torch.distributed``, else 0.

    Raises:
        DataError: fewer than ``p`` classes have at least 2 images, or invalid arguments.
    """

    def __init__(
        self,
        labels: Sequence[Any] | np.ndarray | torch.Tensor | pd.Series,
        p: int,
        k: int,
        *,
        batches_per_epoch: int | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__()
        if int(p) != p or int(k) != k or p < 2 or k < 2:
            raise DataError(
                f"PKSampler needs p >= 2 classes and k >= 2 images per class (positives and negatives "
                f"in every batch), got p={p}, k={k}"
            )
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise DataError(f"batches_per_epoch must be >= 1 or None, got {batches_per_epoch}")
        if seed < 0:
            raise DataError(f"seed must be >= 0, got {seed}")
        self.p = int(p)
        self.k = int(k)
        self.seed = int(seed)
        self.epoch = 0
        self._resume: tuple[int, int] | None = None
        self.num_replicas, self.rank = self._resolve_distributed(num_replicas, rank)

        codes, names = _factorize(labels)
        self.num_samples = len(codes)
        counts = np.bincount(codes, minlength=len(names))
        order = np.argsort(codes, kind="stable")
        members = np.split(order, np.cumsum(counts)[:-1]) if len(names) else []
        usable = [i for i in range(len(names)) if counts[i] >= 2]
        skipped = [names[i] for i in range(len(names)) if counts[i] < 2]
        if skipped:
            logger.warning(
                "PKSampler skips %d of %d class(es) with fewer than 2 images (no positive pair), e.g. %s",
                len(skipped),
                len(names),
                skipped[:5],
            )
        if len(usable) < self.p:
            fix = f"lower p to {len(usable)} or fewer" if len(usable) >= 2 else "add labelled images"
            raise DataError(
                f"PKSampler needs at least p={self.p} classes with >= 2 images, but only {len(usable)} of "
                f"{len(names)} class(es) have that; {fix}"
            )
        self.classes: list[Any] = [names[i] for i in usable]
        self._members: list[np.ndarray] = [members[i] for i in usable]
        self.skipped_classes: list[Any] = skipped
        self._usable_images = int(sum(len(m) for m in self._members))
        self._batches_per_epoch = None if batches_per_epoch is None else int(batches_per_epoch)

    @staticmethod
    def _resolve_distributed(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
        initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
        if num_replicas is None:
            num_replicas = torch.distributed.get_world_size() if initialised else 1
        if rank is None:
            rank = torch.distributed.get_rank() if initialised else 0
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise DataError(
                f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}"
            )
        return int(num_replicas), int(rank)

    @property
    def batches_per_epoch(self) -> int:
        """Batches per epoch on each rank: as given, or the default for the current ``num_replicas``."""
        if self._batches_per_epoch is not None:
            return self._batches_per_epoch
        return max(1, self._usable_images // (self.batch_size * self.num_replicas))

    @property
    def batch_size(self) -> int:
        """Indices per batch, ``p * k``."""
        return self.p * self.k

    @property
    def num_classes(self) -> int:
        """Classes the sampler draws from (those with at least 2 images)."""
        return len(self._members)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batch order :meth:`__iter__` yields (same on every rank)."""
        if epoch < 0:
            raise DataError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    @property
    def sampler(self) -> EpochForwarder:
        """What Lightning's per-epoch hook finds as ``batch_sampler.sampler``: its ``set_epoch`` reaches this one."""
        return EpochForwarder(self)

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Make the next iteration over ``epoch`` start after its first ``batches_done`` batches (once).

        A run resumed from a mid-epoch checkpoint then trains on the batches that came next in the
        interrupted run, not on the epoch's first batches again (the batch order depends only on the
        seed and the epoch, so the skipped batches are drawn and dropped, not stored).
        """
        if epoch < 0 or batches_done < 0:
            raise DataError(f"epoch and batches_done must be >= 0, got {epoch} and {batches_done}")
        self._resume = (int(epoch), int(batches_done))

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        # num_replicas / rank may have been set after construction (e.g. by a data module)
        self._resolve_distributed(self.num_replicas, self.rank)
        skip = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        self._resume = None
        rng = np.random.default_rng([self.seed, self.epoch])
        cycles: dict[int, np.ndarray] = {}
        cursors: dict[int, int] = {}
        n_classes = self.num_classes
        for batch in range(self.batches_per_epoch * self.num_replicas):
            chosen = rng.choice(n_classes, size=self.p, replace=False)
            indices = np.concatenate([self._take(int(c), rng, cycles, cursors) for c in chosen])
            if batch % self.num_replicas == self.rank and batch // self.num_replicas >= skip:
                yield indices.tolist()

    def _take(
        self, c: int, rng: np.random.Generator, cycles: dict[int, np.ndarray], cursors: dict[int, int]
    ) -> np.ndarray:
        members = self._members[c]
        n = len(members)
        if n < self.k:
            picks = np.concatenate([rng.permutation(n), rng.integers(0, n, size=self.k - n)])
            return members[picks]
        start = cursors.get(c, n)
        if start + self.k > n:
            # new cycle: the images the old one had not reached yet go first, so none is skipped
            left = cycles[c][start:] if c in cycles else np.empty(0, dtype=np.int64)
            rest = np.setdiff1d(np.arange(n), left, assume_unique=True)
            cycles[c] = np.concatenate([left, rng.permutation(rest)])
            start = 0
        cursors[c] = start + self.k
        return members[cycles[c][start : start + self.k]]

    def __repr__(self) -> str:
        return (
            f"PKSampler(p={self.p}, k={self.k}, classes={self.num_classes}, "
            f"batches_per_epoch={self.batches_per_epoch}, seed={self.seed}, epoch={self.epoch}, "
            f"rank={self.rank}/{self.num_replicas})"
        )
