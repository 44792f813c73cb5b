"""The Lightning data module for metric learning: records -> P x K train batches, val/test query-gallery."""

from __future__ import annotations

import logging
import warnings
from typing import Any, Literal

import lightning.pytorch as pl
import pandas as pd
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler
from typing_extensions import override

from deepfeat.finetune.data.contract import check_retrievable, validate_records
from deepfeat.finetune.data.dataset import RecordDataset, make_loader
from deepfeat.finetune.data.readers import read_records
from deepfeat.finetune.data.splits import (
    ValMode,
    assign_query_gallery,
    hold_out,
    sample_per_class,
    split_by_class,
    split_by_group,
)
from deepfeat.finetune.data.transforms import build_transforms
from deepfeat.finetune.errors import DataError
from deepfeat.finetune.training.sampler import PKSampler

SplitMode = Literal["as_is", "by_class", "by_group"]
QueryMode = Literal["all_vs_all", "holdout"]
Preset = Literal["fashion", "flip", "shift", "medical", "none"]

log = logging.getLogger(__name__)


def check_measurable(records: pd.DataFrame, split: str, *, exclude_same_group: bool = False) -> None:
    """Refuse a ``split`` on which retrieval cannot be measured: one class, or no query with a positive.

    A split with a single class scores every model 1.0 (each hit has the query's label), so a guard comparing
    two models on it compares nothing.

    Raises:
        DataError: naming the split, its counts and the fix.
    """
    rows = records[records["split"] == split]
    n_classes = int(rows["label"].nunique())
    fix = ("give the split images of 2+ classes (data.split_mode by_group splits within classes; by_class "
           "needs 3+ classes for train, val and test)")
    if n_classes < 2:
        raise DataError(f"the {split!r} split cannot measure retrieval: it holds {len(rows)} images of {n_classes} "
                        f"class(es) {sorted(set(rows['label']))[:5]}, so every model would score 1.0; {fix}")
    try:
        check_retrievable(records, split)
    except DataError as exc:
        raise DataError(f"the {split!r} split cannot measure retrieval: {exc}") from exc
    if exclude_same_group:
        gallery = rows[rows["is_gallery"].astype(bool)]
        groups_per_label = gallery.groupby("label")["group"].nunique()
        queries = rows[rows["is_query"].astype(bool)]
        if not (queries["label"].map(groups_per_label).fillna(0) >= 2).any():
            raise DataError(f"the {split!r} split cannot measure retrieval with the query's own group excluded: no "
                            f"label has gallery images from 2+ groups ({rows['group'].nunique()} groups, "
                            f"{n_classes} classes); add more groups (patients, products) per class to the split")


def _mirror_test_split(df: pd.DataFrame) -> ValMode | None:
    """``val_mode: auto`` on a given split: ``unseen_classes`` when the test split's classes are all new to training.

    A test split of classes the training split lacks says what the model will meet (new categories, new
    diseases): validation then holds out whole classes too, so that the guard and the checkpoint choice reward
    what carries over to new classes. A test split that shares classes with training (or none) keeps the default
    (unseen groups of the training classes).
    """
    train = set(df.loc[df["split"] == "train", "label"].astype(str))
    test = set(df.loc[df["split"] == "test", "label"].astype(str))
    if test and train and not test & train:
        log.info("val_mode auto: the test split's %d class(es) are none of the training split's %d: validating on "
                 "unseen classes", len(test), len(train))
        return "unseen_classes"
    if test:
        log.info("val_mode auto: the test split shares %d of its %d class(es) with training: validating on unseen "
                 "groups of the training classes", len(test & train), len(test))
    return None


def _limit_per_class(df: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    return sample_per_class(df, limit, seed=seed, by=("split", "label"))


class RetrievalDataModule(pl.LightningDataModule):
    """Records -> train (P x K batches) / val / test (query-gallery) loaders.

    Args:
        source: an image folder (one sub-folder per class), a CSV/Parquet manifest, a saved Hugging
            Face dataset directory, or ``fashion-mnist`` (the Debian package's files).
        root: folder that relative manifest paths are resolved against.
        split_mode: ``as_is`` keeps the records' ``split`` column; ``by_class`` makes class-disjoint
            train/val/test (retrieval of unseen classes); ``by_group`` splits within classes, keeping
            each group (product, patient) in one split.
        fractions: train/val/test fractions for ``by_class``/``by_group``.
        val_fraction: with ``as_is`` and no ``val`` rows, this fraction of the train images (groups, classes, as
            ``val_mode`` says) becomes the validation split (early stopping and model selection need it).
        val_mode: what validation rewards, and so what the guard and the checkpoint choice reward:
            ``unseen_classes`` holds out whole classes (a catalogue that gets new categories),
            ``unseen_groups`` whole groups of the training classes (new products, new patients),
            ``same_classes`` images of the training classes at random, groups ignored. ``None`` (the default)
            follows ``split_mode``: ``by_class`` validates on unseen classes, ``by_group`` and ``as_is`` on
            unseen groups (an image is its own group when the data has none). With ``by_class``/``by_group``
            the test split is carved by ``split_mode`` and the validation split by ``val_mode``. ``auto``
            mirrors the test split: with ``as_is`` and a test split none of whose classes the training split
            has (the data says new classes will come), ``unseen_classes``; otherwise as ``None``.
        classes: keep only these labels (e.g. half of the classes for a class-disjoint study).
        limit_per_class: keep at most this many images per class and split (tiny runs).
        query_mode: ``all_vs_all`` (every eval image is a query against all others) or ``holdout``.
        preset: augmentation preset for training (``fashion``, ``flip``, ``shift``, ``medical``, ``none``).
        erasing: probability of random erasing on training images (see ``build_transforms``).
        p, k: classes per batch and images per class (batch size = p x k).
        batches_per_epoch: length of a training epoch in batches (default: one pass over the data).
        eval_batch_size: batch size of val/test/predict loaders.
        num_workers: DataLoader worker processes.
        seed: seed for splits, subsampling and batch sampling.
    """

    def __init__(self, source: str = "fashion-mnist", root: str | None = None, split_mode: SplitMode = "as_is",
                 fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), val_fraction: float = 0.1,
                 val_mode: ValMode | Literal["auto"] | None = None,
                 classes: list[str] | None = None, limit_per_class: int | None = None,
                 query_mode: QueryMode = "all_vs_all", preset: Preset = "none", p: int = 8, k: int = 4,
                 batches_per_epoch: int | None = None, eval_batch_size: int = 128, num_workers: int = 0,
                 seed: int = 0, erasing: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.source = source
        self.root = root
        self._records: pd.DataFrame | None = None
        self._preprocessing: Any = None
        self._class_to_idx: dict[str, int] = {}
        self._resume: dict[str, int] = {}

    @classmethod
    def from_records(cls, records: pd.DataFrame, **kwargs: Any) -> RetrievalDataModule:
        """A data module over an in-memory record table (programmatic use)."""
        dm = cls(source="<records>", **kwargs)
        dm.use_records(records)
        return dm

    def use_records(self, records: pd.DataFrame) -> None:
        """Train on ``records`` (a recipe's own reader) instead of reading ``source``; split as configured."""
        self.source = "<records>"
        self._records = self._prepare(records)

    def _prepare(self, records: pd.DataFrame) -> pd.DataFrame:

        hp = self.hparams
        df = validate_records(records, root=self.root, check_files=False)
        if hp["classes"]:
            wanted = {str(c) for c in hp["classes"]}
            unknown = wanted - set(df["label"].astype(str))
            if unknown:
                raise DataError(f"classes {sorted(unknown)} are not in the data; it has {sorted(set(df['label']))}")
            df = df[df["label"].astype(str).isin(wanted)]
        df = self._split(df)
        df = _limit_per_class(df, hp["limit_per_class"], hp["seed"])
        for split in ("val", "test"):
            if (df["split"] == split).any():
                df = assign_query_gallery(df, split=split, mode=hp["query_mode"], seed=hp["seed"])
        return df.reset_index(drop=True)

    def _split(self, df: pd.DataFrame) -> pd.DataFrame:
        """Train/val/test as ``split_mode`` and ``val_mode`` say (see the class docstring)."""
        hp = self.hparams
        mode, val_mode, seed = hp["split_mode"], hp.get("val_mode"), hp["seed"]
        implied = {"by_class": "unseen_classes", "by_group": "unseen_groups"}.get(mode)
        if mode in ("by_class", "by_group"):
            fractions = tuple(float(f) for f in hp["fractions"])
            split = split_by_class if mode == "by_class" else split_by_group
            val_mode = None if val_mode == "auto" else val_mode  # the test split is carved as split_mode says
            if val_mode is None or val_mode == implied or fractions[1] <= 0:
                return split(df, fractions=fractions, seed=seed)
            # the test split as split_mode says, then validation out of the rest as val_mode says
            fit_share = fractions[0] + fractions[1]
            df = split(df, fractions=(fit_share, 0.0, fractions[2]), seed=seed)
            return hold_out(df, fractions[1] / fit_share, val_mode, seed=seed)
        if (df["split"] == "val").any() or hp["val_fraction"] <= 0:
            return df
        if val_mode == "auto":
            val_mode = _mirror_test_split(df)
        if val_mode in (None, "unseen_groups"):
            # a random share of the training groups (the classes they fall in are shared with train)
            train = df[df["split"] == "train"]
            groups = train["group"].drop_duplicates().sample(frac=hp["val_fraction"], random_state=seed)
            df = df.copy()
            df.loc[(df["split"] == "train") & df["group"].isin(set(groups)), "split"] = "val"
            return df
        return hold_out(df, float(hp["val_fraction"]), val_mode, seed=seed)

    @property
    def records(self) -> pd.DataFrame:
        """All records after filtering, splitting and query/gallery assignment."""
        if self._records is None:

            self._records = self._prepare(read_records(self.source))
        return self._records

    def split_records(self, split: str) -> pd.DataFrame:
        """The records of one split (``train``, ``val``, ``test``)."""
        return self.records[self.records["split"] == split].reset_index(drop=True)

    def eval_records(self, stage: str) -> pd.DataFrame:
        """Records evaluated at ``stage`` (``val`` or ``test``), aligned with the loader's indices."""
        return self.split_records(stage)

    def set_preprocessing(self, preprocessing: Any) -> None:
        """Use this preprocessing (otherwise it is read from the attached LightningModule)."""
        self._preprocessing = preprocessing

    def _pre(self) -> Any:
        if self._preprocessing is None:
            module = getattr(self.trainer, "lightning_module", None) if self.trainer else None
            if module is None or not hasattr(module, "preprocessing"):
                raise DataError("the data module needs the model's preprocessing: attach it to a Trainer with "
                                "a MetricLearningModule, or call set_preprocessing(model.preprocessing)")
            self._preprocessing = module.preprocessing
        return self._preprocessing

    @override
    def setup(self, stage: str) -> None:
        train = self.split_records("train")
        self._class_to_idx = {c: i for i, c in enumerate(sorted(train["label"].astype(str).unique()))}
        module = self.trainer.lightning_module if self.trainer is not None else None
        fit_to_classes = getattr(module, "fit_to_classes", None)
        if callable(fit_to_classes):
            # before the callbacks' setup (EMA copies the module there): a loss with class weights gets its shape;
            # at every stage, so that validate/test/predict --ckpt_path find the shapes the checkpoint holds
            fit_to_classes(len(self._class_to_idx))

    def dataset(self, split: str, *, train: bool = False) -> RecordDataset:
        """A dataset over one split, with training augmentation or the eval pipeline."""

        preset = self.hparams["preset"] if train else "none"
        tf = build_transforms(self._pre(), preset=preset, train=train, erasing=self.hparams.get("erasing", 0.0))
        return RecordDataset(self.split_records(split), tf, class_to_idx=self._class_to_idx or None, root=self.root)

    @override
    def train_dataloader(self) -> DataLoader[dict[str, Any]]:

        ds = self.dataset("train", train=True)
        hp = self.hparams
        sampler = PKSampler(ds.labels, p=self._batch_classes(), k=hp["k"], batches_per_epoch=hp["batches_per_epoch"],
                            seed=hp["seed"])
        if self.trainer is not None:
            sampler.set_epoch(self.trainer.current_epoch)
            if self.trainer.world_size > 1:
                sampler.num_replicas, sampler.rank = self.trainer.world_size, self.trainer.global_rank
        if self._resume:
            sampler.resume_at(self._resume["epoch"], self._resume["batches_done"])
            self._resume = {}
        return make_loader(ds, batch_sampler=sampler, num_workers=hp["num_workers"])

    def _batch_classes(self) -> int:
        """``p``, or fewer when fewer training classes have the 2+ images a positive pair needs."""
        p = int(self.hparams["p"])
        counts = self.split_records("train")["label"].value_counts()
        usable = int((counts >= 2).sum())
        if 2 <= usable < p:
            log.info("only %d training classes have 2+ images: batches take p=%d classes instead of %d", usable,
                     usable, p)
            return usable
        return p

    @override
    def state_dict(self) -> dict[str, Any]:
        """Where training stands in the current epoch (saved in every checkpoint).

        The DataLoader itself keeps no state, so without this a run resumed from a mid-epoch checkpoint
        (``ModelCheckpoint(every_n_train_steps=...)``) would train on the epoch's first batches again
        instead of the ones that came next, and end elsewhere than the uninterrupted run.
        """
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        # batches whose step is done, the one being checkpointed in on_train_batch_end included
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        done = int(getattr(progress, "processed", progress.ready))
        return {"epoch": int(trainer.current_epoch), "batches_done": done}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the next training loader skips the batches already done."""
        if "epoch" in state_dict and "batches_done" in state_dict:
            self._resume = {"epoch": int(state_dict["epoch"]), "batches_done": int(state_dict["batches_done"])}
            # Lightning warns that a plain DataLoader cannot resume mid-epoch; this one does (see state_dict)
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")

    def _eval_loader(self, split: str) -> DataLoader[dict[str, Any]]:
        if not (self.records["split"] == split).any():
            raise DataError(f"there is no {split!r} split in the data (splits: {sorted(set(self.records['split']))}); "
                            f"choose split_mode 'by_class' or 'by_group', or give val_fraction > 0")
        ds = self.dataset(split)
        batch_size, workers = int(self.hparams["eval_batch_size"]), int(self.hparams["num_workers"])
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        if trainer is not None and world > 1:
            # Under DDP each rank embeds its own share of the split (use_distributed_sampler is off, so Lightning
            # does not shard it); the module gathers the shares and scores the whole split. DistributedSampler
            # pads the last share with repeated images, which the module drops by index.
            shard: DistributedSampler[int] = DistributedSampler(ds, num_replicas=world, rank=trainer.global_rank,
                                                                shuffle=False)
            return make_loader(ds, batch_sampler=BatchSampler(shard, batch_size, drop_last=False), num_workers=workers)
        return make_loader(ds, batch_size=batch_size, num_workers=workers)

    @override
    def val_dataloader(self) -> DataLoader[dict[str, Any]]:
        return self._eval_loader("val")

    @override
    def test_dataloader(self) -> DataLoader[dict[str, Any]]:
        return self._eval_loader("test")

    @override
    def predict_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Every record of the data (all splits, in order), with the eval pipeline: what ``deepfeat predict``
        embeds (``EmbeddingWriter`` maps each batch's ``index`` back to :attr:`records`)."""

        ds = RecordDataset(self.records, build_transforms(self._pre(), preset="none", train=False), root=self.root)
        return make_loader(ds, batch_size=int(self.hparams["eval_batch_size"]),
                           num_workers=int(self.hparams["num_workers"]))
