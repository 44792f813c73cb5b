"""deepfeat.finetune: data, backbones, embedding models, metric-learning training, metrics, export.

Attributes are imported lazily so that ``import deepfeat.finetune.bundle`` (used by the Milvus
connector) does not pull in Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "create_backbone": "backbones", "Backbone": "backbones", "Preprocessing": "backbones",
    "EmbeddingModel": "model", "build_embedding_model": "model",
    "ModelBundle": "bundle", "export_bundle": "bundle", "read_card": "bundle",
    "MetricLearningModule": "module", "FreezeBackbone": "module",
    "RetrievalDataModule": "datamodule", "RecordDataset": "data", "SkipReport": "data",
    "retrieval_metrics": "metrics", "retrieval_metrics_from_records": "metrics",
    "embed_to_parquet": "embed", "iter_embeddings": "embed", "read_shards": "embed",
    "evaluate_models": "evaluate", "read_records": "records", "load_image": "images",
    "build_transforms": "transforms", "PKSampler": "sampler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"deepfeat.finetune.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'deepfeat.finetune' has no attribute {name!r}")
