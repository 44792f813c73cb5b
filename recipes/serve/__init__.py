"""``deepfeat serve``: a local web page to judge retrieval by looking.

Drop or pick a query image and see the top-k hits of a collection as a grid with scores and metadata;
filter by metadata fields, group by one, and compare two collections (off-the-shelf vs fine-tuned)
side by side. :func:`create_app` builds the FastAPI app; the page is plain HTML and JavaScript served
from ``static/`` beside this package (nothing from a CDN).

By role: :mod:`.requests` (search parameters and filters, validated), :mod:`.security`
(loopback and Host guards, body limit, security headers, image files and Hugging Face dataset folders from
inside the image root only), :mod:`.state` (panels over shared connectors and bundles, no HTTP) and :mod:`.app` (the
routes). Filters become Milvus expressions in the query layer (:mod:`deepfeat.connectors.query`). The
command is :mod:`deepfeat.recipes.cli.serve`.
"""

from deepfeat.connectors.query import OPS, Condition, Op, build_filter, quote_string

from .app import STATIC_DIR, create_app, status_of
from .requests import (
    MAX_FILTER_VALUE,
    MAX_FILTERS,
    MAX_GROUP_SIZE,
    MAX_TOP_K,
    NotFoundError,
    PayloadTooLargeError,
    SearchRequest,
    check_group_by,
    parse_search_request,
)
from .security import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    LOOPBACK_NAMES,
    MAX_UPLOAD_BYTES,
    BodyLimit,
    SecurityHeaders,
    allowed_hosts_for,
    check_host,
    image_root_of,
    is_loopback,
    locate_image,
    resolve_hf_dataset,
    resolve_image_path,
    shown_path,
)
from .state import LRU, THUMBNAIL_SIZE, Panel, PanelConfig, ServeState

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "LOOPBACK_NAMES",
    "LRU",
    "MAX_FILTERS",
    "MAX_FILTER_VALUE",
    "MAX_GROUP_SIZE",
    "MAX_TOP_K",
    "MAX_UPLOAD_BYTES",
    "OPS",
    "STATIC_DIR",
    "THUMBNAIL_SIZE",
    "BodyLimit",
    "Condition",
    "NotFoundError",
    "Op",
    "Panel",
    "PanelConfig",
    "PayloadTooLargeError",
    "SearchRequest",
    "SecurityHeaders",
    "ServeState",
    "allowed_hosts_for",
    "build_filter",
    "check_group_by",
    "check_host",
    "create_app",
    "image_root_of",
    "is_loopback",
    "locate_image",
    "parse_search_request",
    "quote_string",
    "resolve_hf_dataset",
    "resolve_image_path",
    "shown_path",
    "status_of",
]
