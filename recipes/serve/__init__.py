"""``deepfeat serve``: a local web page to judge retrieval by looking.

Drop or pick a query image and see the top-k hits of a collection as a grid with scores and metadata;
filter by metadata fields, group by one, and compare two collections (off-the-shelf vs fine-tuned)
side by side. :func:`create_app` builds the FastAPI app; the page is plain HTML and JavaScript served
from ``static/`` beside this package (nothing from a CDN).

By role: :mod:`.requests` (search parameters and filters, validated and quoted), :mod:`.security`
(loopback and Host guards, body limit, security headers, image files from inside the image root
only), :mod:`.state` (panels over shared connectors and bundles, no HTTP) and :mod:`.app` (the
routes). The command is :mod:`deepfeat.recipes.cli.serve`.
"""

import argparse
import importlib
import importlib.util
from pathlib import Path

from deepfeat.connectors.search import quote_string

from .app import STATIC_DIR, create_app, status_of
from .requests import (
    MAX_FILTER_VALUE,
    MAX_FILTERS,
    MAX_GROUP_SIZE,
    MAX_TOP_K,
    OPS,
    Condition,
    NotFoundError,
    Op,
    PayloadTooLargeError,
    SearchRequest,
    build_filter,
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
    resolve_image_path,
    shown_path,
)
from .state import LRU, THUMBNAIL_SIZE, Panel, PanelConfig, ServeState

_COMMAND_MODULE = "deepfeat.recipes.cli.serve"


def add_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``deepfeat serve`` (its code is in :mod:`deepfeat.recipes.cli.serve`).

    A bridge while ``recipes/cli.py`` is still a module (so ``deepfeat.recipes.cli.serve`` cannot be
    imported by name) and lists this package among its command modules: the command module is then
    loaded from its file. Remove it once ``recipes/cli/`` is a package that registers
    ``deepfeat.recipes.cli.serve`` itself. The import is deferred because the command module imports
    this package.
    """
    try:
        module = importlib.import_module(_COMMAND_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name not in (_COMMAND_MODULE, "deepfeat.recipes.cli"):
            raise
        location = Path(__file__).resolve().parents[1] / "cli" / "serve.py"
        spec = importlib.util.spec_from_file_location(_COMMAND_MODULE, location)
        if spec is None or spec.loader is None:
            raise
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    module.add_cli(sub)


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
    "add_cli",
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
    "resolve_image_path",
    "shown_path",
    "status_of",
]
