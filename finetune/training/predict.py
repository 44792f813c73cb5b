"""``deepfeat predict``: embeddings written by a ``BasePredictionWriter`` to the shard contract.

:class:`EmbeddingWriter` takes the ``{"embeddings", "index", "errors"}`` that
:meth:`MetricLearningModule.predict_step <deepfeat.finetune.training.module.MetricLearningModule.predict_step>`
returns for each batch of the data module's predict loader (every record of the data, all splits) and writes them
through :class:`~deepfeat.finetune.inference.shards.ShardWriter`: ``part-NNNNN.parquet`` shards as ``deepfeat
embed`` writes them (ids, metadata, ``content_hash``, the bundle fingerprint), and ``_report.json`` for the images
that failed to decode. The model being predicted is exported beside the shards (``bundle/``, weights and card) so
that the fingerprint the shards carry names a real bundle: ``deepfeat load`` and ``deepfeat search --bundle`` take
the pair as they take the output of ``deepfeat export`` + ``deepfeat embed``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from deepfeat.finetune.data.dataset import SkipReport, record_source
from deepfeat.finetune.data.images import content_hash
from deepfeat.finetune.errors import DataError, DeepfeatError, ModelError
from deepfeat.finetune.inference.shards import ShardWriter
from deepfeat.finetune.models.bundle import ModelBundle, export_bundle

__all__ = ["EmbeddingWriter"]

log = logging.getLogger(__name__)


class EmbeddingWriter(BasePredictionWriter):
    """Writes the embeddings of ``trainer.predict`` as Parquet shards (the ``deepfeat embed`` contract).

    Args:
        out_dir: the shard directory; ``None``: ``<trainer.default_root_dir>/predictions``. A directory already
            holding shards of the same model is resumed (their records are written again only if missing); one
            holding another model's shards is refused.
        name: the name of the bundle exported to ``out_dir/bundle`` (its ``bundle_id`` is ``name@<weights
            hash>``); ``None``: the name of ``out_dir``.
        shard_size: rows per shard.
    """

    def __init__(self, out_dir: str | None = None, name: str | None = None, shard_size: int = 50_000) -> None:
        super().__init__(write_interval="batch")
        if shard_size < 1:
            raise DataError(f"shard_size must be at least 1, got {shard_size}")
        self.out_dir = out_dir
        self.name = name
        self.shard_size = shard_size
        self.bundle_dir: Path | None = None
        self._writer: ShardWriter | None = None
        self._report = SkipReport()
        self._records: Any = None
        self._root: str | None = None

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        if model is None:
            raise ModelError(f"EmbeddingWriter needs a MetricLearningModule (got {type(pl_module).__name__})")
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "records"):
            raise DataError("EmbeddingWriter needs the RetrievalDataModule that made the predict loader; pass "
                            "datamodule= to trainer.predict")
        out = Path(self.out_dir) if self.out_dir else Path(trainer.default_root_dir) / "predictions"
        self.bundle_dir = out / "bundle"
        if trainer.is_global_zero:
            was_training = model.training
            # weights and card only: TorchScript and ONNX are for serving, 'deepfeat export' writes them
            export_bundle(model, self.bundle_dir, name=self.name or out.name, torchscript=False, onnx=False,
                          overwrite=True, training={"predicted_by": "deepfeat predict"})
            model.train(was_training)
            model.to(pl_module.device)
        trainer.strategy.barrier("deepfeat-predict-bundle")  # the other ranks read the bundle rank 0 wrote
        fingerprint = ModelBundle.load(self.bundle_dir, device="cpu").fingerprint()
        self._writer = ShardWriter(out, fingerprint, shard_size=self.shard_size)
        self._records = dm.records
        self._root = getattr(dm, "root", None)
        self._report = SkipReport()
        log.info("predict: embedding %d records into %s (bundle %s)", len(self._records), out,
                 fingerprint["bundle_id"])

    @override
    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        if self._writer is None:
            raise DataError("EmbeddingWriter got a batch before on_predict_start; run it through trainer.predict")
        records = self._records
        for index, reason in prediction.get("errors", []):
            row = records.iloc[int(index)]
            self._report.add(str(row["id"]), str(row.get("path") or "<in-memory image>"), str(reason))
        vectors = prediction["embeddings"].numpy().astype(np.float32, copy=False)
        if not len(vectors):
            return
        if not np.isfinite(vectors).all():
            raise DeepfeatError(f"the model produced {int((~np.isfinite(vectors).all(axis=1)).sum())} non-finite "
                                f"embeddings in batch {batch_idx}; the checkpoint's weights are damaged")
        rows = records.iloc[prediction["index"].numpy()].copy()
        done = self._writer.done_ids
        keep = ~rows["id"].astype(str).isin(done).to_numpy() if done else np.ones(len(rows), dtype=bool)
        rows, vectors = rows[keep], vectors[keep]
        rows["content_hash"] = [_hash(row, self._root) for _, row in rows.iterrows()]
        self._writer.add(rows, np.ascontiguousarray(vectors))

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._writer is None:
            return
        report = self._writer.close(self._report)
        out = self._writer.out
        log.info("predict: %d embeddings in %d shards in %s (%d skipped, report %s); load them with 'deepfeat load "
                 "%s --collection NAME --bundle %s'", self._writer.n_written, len(self._writer.shards), out,
                 len(self._report), report, out, self.bundle_dir)


def _hash(row: Any, root: str | None) -> str:
    try:
        return content_hash(record_source(row, root))
    except (OSError, DeepfeatError):
        return ""
