"""deepfeat.connectors: Milvus collections of deepfeat embeddings.

One connector for every Milvus (a local ``.db`` path for Milvus Lite, ``http(s)://`` for a server),
collections derived from a model bundle, idempotent resumable loading, incremental sync with
alias-switched re-indexing, one query layer (typed filters, fetches, search by image, id or
vector; collections deepfeat did not create are searchable by vector), and a pymilvus-model style embedding
function. No Lightning is imported here.
"""

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
from deepfeat.connectors.schema import CollectionSpec, IndexSpec, ScalarField, primary_key
from deepfeat.connectors.search import format_hits_table, search_images
from deepfeat.connectors.sync import SyncReport, reindex, sync_records

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
