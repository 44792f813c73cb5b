"""deepfeat.connectors: Milvus collections of deepfeat embeddings.

One connector for every Milvus (a local ``.db`` path for Milvus Lite, ``http(s)://`` for a server),
collections derived from a model bundle, idempotent resumable loading, incremental sync with
alias-switched re-indexing, one query layer (typed filters, fetches, search by image, id or
vector; collections deepfeat did not create are searchable by vector), and a pymilvus-model style embedding
function. No Lightning is imported here.

Attributes are imported lazily, so that ``import deepfeat.connectors.collection`` (``deepfeat collections
list``) does not import torch through the embedding function or the image search.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deepfeat.connectors.bulk import BulkStaging, bulk_import_shards
    from deepfeat.connectors.client import MilvusConnector, TLSOptions, connect, resolve_token
    from deepfeat.connectors.collection import (
        CollectionInfo,
        collection_info,
        create_collection,
        create_index,
        describe_collection,
        drop_collection,
        list_collections,
        open_collection,
        verify_index,
    )
    from deepfeat.connectors.fields import ScalarField, primary_key
    from deepfeat.connectors.index import IndexSpec
    from deepfeat.connectors.load import LoadReport, load_embeddings, load_shards
    from deepfeat.connectors.plugin import DeepfeatImageEmbeddingFunction
    from deepfeat.connectors.query import (
        Condition,
        build_filter,
        collection_frame,
        fetch_rows,
        fetch_vectors,
        iter_collection,
        query_rows,
        search_each,
        search_ids,
        search_vectors,
    )
    from deepfeat.connectors.schema import CollectionSpec
    from deepfeat.connectors.search import format_hits_table, search_images
    from deepfeat.connectors.sync import SyncReport, reindex, sync_records

#: public name -> the submodule (of deepfeat.connectors) that defines it
_EXPORTS = {
    "BulkStaging": "bulk", "bulk_import_shards": "bulk",
    "MilvusConnector": "client", "TLSOptions": "client", "connect": "client", "resolve_token": "client",
    "CollectionInfo": "collection", "collection_info": "collection", "create_collection": "collection",
    "create_index": "collection", "describe_collection": "collection", "drop_collection": "collection",
    "list_collections": "collection", "open_collection": "collection", "verify_index": "collection",
    "LoadReport": "load", "load_embeddings": "load", "load_shards": "load",
    "DeepfeatImageEmbeddingFunction": "plugin",
    "Condition": "query", "build_filter": "query", "collection_frame": "query", "fetch_rows": "query",
    "fetch_vectors": "query", "iter_collection": "query", "query_rows": "query", "search_each": "query",
    "search_ids": "query", "search_vectors": "query",
    "CollectionSpec": "schema", "IndexSpec": "index", "ScalarField": "fields", "primary_key": "fields",
    "format_hits_table": "search", "search_images": "search",
    "SyncReport": "sync", "reindex": "sync", "sync_records": "sync",
}

__all__ = [
    "BulkStaging",
    "CollectionInfo",
    "CollectionSpec",
    "Condition",
    "DeepfeatImageEmbeddingFunction",
    "IndexSpec",
    "LoadReport",
    "MilvusConnector",
    "ScalarField",
    "SyncReport",
    "TLSOptions",
    "build_filter",
    "bulk_import_shards",
    "collection_frame",
    "collection_info",
    "connect",
    "create_collection",
    "create_index",
    "describe_collection",
    "drop_collection",
    "fetch_rows",
    "fetch_vectors",
    "format_hits_table",
    "iter_collection",
    "list_collections",
    "load_embeddings",
    "load_shards",
    "open_collection",
    "primary_key",
    "query_rows",
    "reindex",
    "resolve_token",
    "search_each",
    "search_ids",
    "search_images",
    "search_vectors",
    "sync_records",
    "verify_index",
]


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use (PEP 562)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"deepfeat.connectors.{_EXPORTS[name]}"), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'deepfeat.connectors' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
