"""deepfeat.finetune: data, backbones, embedding models, metric-learning training, metrics, export.

Attributes are imported lazily so that ``import deepfeat.finetune.models.bundle`` (used by the Milvus
connector) does not pull in Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "create_backbone": "models.backbones", "Backbone": "models.backbones", "Preprocessing": "models.backbones",
    "EmbeddingModel": "models.model", "build_embedding_model": "models.model",
    "ModelBundle": "models.bundle", "export_bundle": "models.bundle", "read_card": "models.bundle",
    "MetricLearningModule": "training.module", "FreezeBackbone": "training.callbacks",
    "ExportBundle": "training.callbacks", "RetrievalDataModule": "training.datamodule",
    "RecordDataset": "data.dataset", "SkipReport": "data.dataset",
    "retrieval_metrics": "metrics", "retrieval_metrics_from_records": "metrics",
    "embed_to_parquet": "inference.embed", "iter_embeddings": "inference.embed", "read_shards": "inference.embed",
    "evaluate_models": "inference.evaluate", "read_records": "data.readers", "load_image": "data.images",
    "build_transforms": "data.transforms", "PKSampler": "training.sampler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"deepfeat.finetune.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'deepfeat.finetune' has no attribute {name!r}")
