"""A pymilvus-model style embedding function for images, built from a deepfeat model bundle.

Milvus users write ``ef = SentenceTransformerEmbeddingFunction(...)``, then
``client.insert(..., [{"vector": v} for v in ef.encode_documents(texts)])`` and
``client.search(..., data=ef.encode_queries(queries))``. :class:`DeepfeatImageEmbeddingFunction` has
the same shape (``encode_documents``, ``encode_queries``, ``dim``, callable, ``model_name``) for images,
so a fine-tuned deepfeat model plugs in where a text model does today::

    ef = DeepfeatImageEmbeddingFunction("runs/fashion/bundle")
    client.create_collection("shoes", dimension=ef.dim, metric_type=ef.metric)
    client.insert("shoes", [{"id": i, "vector": v} for i, v in enumerate(ef.encode_documents(paths))])
    client.search("shoes", data=ef.encode_queries(["query.jpg"]), limit=5)
    ef.record_bundle(client, "shoes")  # lets deepfeat search it by image too (and check the bundle)

Such a collection is searchable by vector with deepfeat as it is (``deepfeat search --vector-file``); a
search by image needs the bundle recorded on it (:meth:`DeepfeatImageEmbeddingFunction.record_bundle`),
so that a query embedded by another model or preprocessing is refused instead of compared.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepfeat.connectors.client import MilvusConnector
from deepfeat.connectors.schema import PROP_BUNDLE
from deepfeat.finetune.inference.runtime import resolve_device
from deepfeat.finetune.models.bundle import ModelBundle

log = logging.getLogger(__name__)


def _as_array(image: Any) -> Any:
    """PIL images become arrays; paths, bytes and arrays are passed on to ``load_image``."""
    if hasattr(image, "mode") and hasattr(image, "size") and hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"))
    return image


class DeepfeatImageEmbeddingFunction:
    """Images to embeddings with a deepfeat bundle, in the shape of pymilvus' model components.

    Args:
        bundle: a bundle directory or a loaded :class:`ModelBundle`.
        device: where the model runs (``"cpu"``, ``"cuda"``); by the one runtime rule
            (:func:`deepfeat.finetune.inference.runtime.resolve_device`: argument > ``$DEEPFEAT_DEVICE`` > a
            loaded bundle's own device > CUDA when available).
        batch_size: images per forward pass.

    Images may be file paths, encoded bytes, HxW/HxWxC uint8 arrays or PIL images; the bundle's own
    preprocessing is applied, so the vectors match those ``deepfeat embed`` stored.
    """

    def __init__(
        self, bundle: str | Path | ModelBundle, *, device: str | torch.device | None = None, batch_size: int = 64
    ) -> None:
        if isinstance(bundle, ModelBundle):
            self.bundle = bundle
            self.bundle.model.to(resolve_device(device, model=bundle.model))
        else:
            self.bundle = ModelBundle.load(bundle, device=resolve_device(device))
        self.batch_size = batch_size
        self.model_name = self.bundle.card.name

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(model_name={self.model_name!r}, dim={self.dim}, metric={self.metric!r})"

    @property
    def dim(self) -> int:
        """Size of each embedding."""
        return self.bundle.dim

    @property
    def metric(self) -> str:
        """The metric the embeddings are meant for (``COSINE`` for L2-normalised output)."""
        return self.bundle.card.metric

    def fingerprint(self) -> dict[str, Any]:
        """The bundle fingerprint (name, id, dim, metric, preprocessing) to store beside the vectors."""
        return self.bundle.fingerprint()

    def record_bundle(self, client: Any, collection: str) -> None:
        """Record this bundle's fingerprint on ``collection`` (a collection property), which this function
        filled, so that deepfeat searches it by image and refuses queries of any other bundle.

        Args:
            client: a ``pymilvus.MilvusClient`` or a :class:`~deepfeat.connectors.client.MilvusConnector`.
            collection: the collection's name.
        """
        milvus = client.client if isinstance(client, MilvusConnector) else client
        milvus.alter_collection_properties(
            collection, properties={PROP_BUNDLE: json.dumps(self.fingerprint(), sort_keys=True)}
        )
        log.info("recorded bundle %s on collection %s", self.fingerprint().get("bundle_id"), collection)

    def _encode(self, images: Sequence[Any]) -> list[np.ndarray]:
        if isinstance(images, str | Path | bytes):
            images = [images]
        items = [_as_array(x) for x in images]
        if not items:
            return []
        vectors = self.bundle.embed(items, batch_size=self.batch_size)
        return list(vectors)

    def encode_documents(self, documents: Sequence[Any]) -> list[np.ndarray]:
        """Embeddings of the images to index (one float32 array of ``dim`` per image)."""
        return self._encode(documents)

    def encode_queries(self, queries: Sequence[Any]) -> list[np.ndarray]:
        """Embeddings of query images (same model and preprocessing as the documents)."""
        return self._encode(queries)

    def __call__(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        """Same as :meth:`encode_documents`."""
        return self._encode(inputs)
