"""deepfeat.finetune.training.sampler.PKSampler: batch shape, determinism, DDP splitting, edge cases."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from deepfeat.finetune.errors import DataError
from deepfeat.finetune.training.sampler import PKSampler


def _labels(sizes: dict[str, int]) -> list[str]:
    return [label for label, n in sizes.items() for _ in range(n)]


def _assert_pk(batch: list[int], labels: list[str], p: int, k: int) -> None:
    counts = Counter(labels[i] for i in batch)
    assert len(batch) == p * k
    assert len(counts) == p and set(counts.values()) == {k}


def test_every_batch_has_p_classes_of_k_images() -> None:
    labels = _labels({f"c{i}": 10 + i for i in range(8)})
    sampler = PKSampler(labels, p=4, k=3, batches_per_epoch=25)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 25
    for batch in batches:
        _assert_pk(batch, labels, 4, 3)
        assert len(set(batch)) == 12  # classes with >= k images give distinct images
        assert all(isinstance(i, int) for i in batch)


def test_default_epoch_length_sees_each_image_about_once() -> None:
    labels = _labels({f"c{i}": 12 for i in range(10)})
    assert len(PKSampler(labels, p=5, k=4)) == 120 // 20
    assert len(PKSampler(labels, p=5, k=4, num_replicas=2, rank=1)) == 120 // 40
    assert len(PKSampler(_labels({"a": 2, "b": 2}), p=2, k=4)) == 1


def test_images_are_cycled_before_repeating() -> None:
    labels = _labels({"a": 8, "b": 8})
    sampler = PKSampler(labels, p=2, k=4, batches_per_epoch=2)
    seen = [i for batch in sampler for i in batch]
    assert sorted(seen) == list(range(16))  # two draws of 4 cover each class of 8 exactly


def test_small_classes_are_sampled_with_replacement() -> None:
    labels = _labels({"small": 3, "big1": 10, "big2": 10})
    sampler = PKSampler(labels, p=3, k=5, batches_per_epoch=5)
    for batch in sampler:
        _assert_pk(batch, labels, 3, 5)
        small = [i for i in batch if labels[i] == "small"]
        assert set(small) == {0, 1, 2}  # all of them, plus repeats


def test_singleton_classes_are_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    labels = _labels({"solo1": 1, "a": 4, "solo2": 1, "b": 4, "c": 4})
    with caplog.at_level(logging.WARNING, logger="deepfeat.finetune.training.sampler"):
        sampler = PKSampler(labels, p=3, k=2, batches_per_epoch=10)
    assert "skips 2 of 5 class(es)" in caplog.text and "solo1" in caplog.text
    assert sampler.num_classes == 3 and sampler.skipped_classes == ["solo1", "solo2"]
    used = {labels[i] for batch in sampler for i in batch}
    assert used == {"a", "b", "c"}


def test_too_few_classes_says_how_many_and_to_lower_p() -> None:
    labels = _labels({"a": 5, "b": 5, "c": 1})
    with pytest.raises(DataError, match=r"only 2 of 3 class\(es\).*lower p to 2"):
        PKSampler(labels, p=4, k=2)


def test_invalid_arguments() -> None:
    labels = _labels({"a": 4, "b": 4})
    for p, k in ((1, 4), (2, 1), (0, 0)):
        with pytest.raises(DataError, match="p >= 2"):
            PKSampler(labels, p=p, k=k)
    with pytest.raises(DataError, match="batches_per_epoch"):
        PKSampler(labels, p=2, k=2, batches_per_epoch=0)
    with pytest.raises(DataError, match="rank"):
        PKSampler(labels, p=2, k=2, num_replicas=2, rank=2)
    with pytest.raises(DataError, match="missing"):
        PKSampler([None, "a", "a", "b", "b"], p=2, k=2)
    with pytest.raises(DataError, match="one-dimensional"):
        PKSampler(np.zeros((4, 2)), p=2, k=2)


def test_deterministic_per_seed_and_epoch() -> None:
    labels = _labels({f"c{i}": 6 for i in range(6)})
    a = PKSampler(labels, p=3, k=2, batches_per_epoch=6, seed=1)
    b = PKSampler(labels, p=3, k=2, batches_per_epoch=6, seed=1)
    assert list(a) == list(b) == list(a)  # re-iterating the same epoch repeats it
    epoch0 = list(a)
    a.set_epoch(1)
    assert list(a) != epoch0
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(PKSampler(labels, p=3, k=2, batches_per_epoch=6, seed=2)) != epoch0


def test_distributed_ranks_get_disjoint_shares_of_one_sequence() -> None:
    labels = _labels({f"c{i}": 5 for i in range(7)})
    world = 3
    single = PKSampler(labels, p=3, k=2, batches_per_epoch=4 * world, seed=9)
    ranks = [
        PKSampler(labels, p=3, k=2, batches_per_epoch=4, seed=9, num_replicas=world, rank=r)
        for r in range(world)
    ]
    for sampler in (single, *ranks):
        sampler.set_epoch(2)
    per_rank = [list(r) for r in ranks]
    assert all(len(b) == 4 for b in per_rank)
    global_batches = list(single)
    for r in range(world):
        assert per_rank[r] == global_batches[r::world]
    as_sets = [{tuple(b) for b in batches} for batches in per_rank]
    assert not (as_sets[0] & as_sets[1]) and not (as_sets[1] & as_sets[2])


def test_label_types() -> None:
    expected = list(PKSampler([0, 0, 1, 1, 2, 2], p=2, k=2, batches_per_epoch=3))
    assert list(PKSampler(np.array([0, 0, 1, 1, 2, 2]), p=2, k=2, batches_per_epoch=3)) == expected
    assert list(PKSampler(torch.tensor([0, 0, 1, 1, 2, 2]), p=2, k=2, batches_per_epoch=3)) == expected
    assert list(PKSampler(list("aabbcc"), p=2, k=2, batches_per_epoch=3)) == expected
    assert PKSampler([1, "1", 1, "1"], p=2, k=2).num_classes == 2


def test_works_as_a_dataloader_batch_sampler() -> None:
    labels = torch.tensor([i // 4 for i in range(24)])
    dataset = TensorDataset(torch.arange(24), labels)
    sampler = PKSampler(labels, p=3, k=4, batches_per_epoch=5)
    loader = DataLoader(dataset, batch_sampler=sampler)
    assert len(loader) == 5
    for indices, batch_labels in loader:
        assert indices.shape == (12,)
        assert sorted(Counter(batch_labels.tolist()).values()) == [4, 4, 4]
    assert "p=3, k=4" in repr(sampler) and sampler.batch_size == 12


def test_replicas_set_after_construction_are_honoured() -> None:
    labels = _labels({f"c{i}": 8 for i in range(8)})
    sampler = PKSampler(labels, p=2, k=4)
    assert len(sampler) == 8
    sampler.num_replicas, sampler.rank = 2, 1
    assert len(sampler) == 4 and len(list(sampler)) == 4
    sampler.rank = 2
    with pytest.raises(DataError, match="rank"):
        list(sampler)
