"""``deepfeat serve``: the command that starts the local search page (the page: :mod:`deepfeat.recipes.serve`)."""

from __future__ import annotations

import argparse
import os
import socket

from deepfeat.connectors.client import DEFAULT_URI, URI_ENV_VAR
from deepfeat.finetune.errors import DataError, DeepfeatError, MissingExtraError
from deepfeat.recipes.serve import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    MAX_UPLOAD_BYTES,
    PanelConfig,
    ServeState,
    allowed_hosts_for,
    check_host,
    create_app,
)


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as exc:
            raise DeepfeatError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port, or stop "
                f"what is using it"
            ) from exc


def panels_from_args(args: argparse.Namespace) -> list[PanelConfig]:
    """The panels the ``serve`` options describe.

    Raises:
        DataError: compare options given without both ``--compare-collection`` and ``--compare-bundle``.
    """
    uri = args.uri or os.environ.get(URI_ENV_VAR) or DEFAULT_URI
    panels = [PanelConfig(args.label or args.collection, uri, args.collection, args.bundle, args.image_root)]
    compare = [
        args.compare_uri,
        args.compare_collection,
        args.compare_bundle,
        args.compare_label,
        args.compare_image_root,
    ]
    if any(v is not None for v in compare):
        if not (args.compare_collection and args.compare_bundle):
            raise DataError(
                "comparing needs both --compare-collection and --compare-bundle (and --compare-uri when the "
                "second collection is in another database)"
            )
        label = args.compare_label or args.compare_collection
        if label == panels[0].label:
            label = f"{label} (2)"
        panels.append(
            PanelConfig(
                label,
                args.compare_uri or uri,
                args.compare_collection,
                args.compare_bundle,
                args.compare_image_root or args.image_root,
            )
        )
    return panels


def _cmd_serve(args: argparse.Namespace) -> int:
    check_host(args.host, args.allow_remote)
    if not 0 < args.port < 65536:
        raise DataError(f"--port must be from 1 to 65535, got {args.port}")
    if args.max_upload_mb <= 0:
        raise DataError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    try:
        import uvicorn
    except ImportError as exc:
        raise MissingExtraError("uvicorn", "serve", "deepfeat serve") from exc
    panels = panels_from_args(args)
    _check_port(args.host, args.port)
    app = create_app(
        panels,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        allowed_hosts=allowed_hosts_for(args.host, args.allow_remote),
    )
    state: ServeState = app.state.deepfeat
    shown = f"[{args.host.strip('[]')}]" if ":" in args.host.strip("[]") else args.host
    for p in state.panels:
        print(
            f"  {p.config.label}: collection {p.spec.name!r} ({p.rows} rows) at {p.conn.display_uri}, "
            f"bundle {p.bundle.card.bundle_id}"
        )
    print(f"deepfeat serve: http://{shown}:{args.port}/  (Ctrl+C to stop)", flush=True)
    verbose = int(getattr(args, "verbose", 0) or 0)
    uvicorn.run(
        app,
        host=args.host.strip("[]"),
        port=args.port,
        log_level="info" if verbose else "warning",
        access_log=verbose > 0,
    )
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``deepfeat serve``."""
    p = sub.add_parser(
        "serve",
        help="a local web page: search a collection by image, filter, group, compare two collections",
        description="Start a local web page over a collection and its model bundle: drop or pick a query "
        "image and see the top-k hits with scores and metadata; filter by metadata, group by a field, and "
        "compare a second collection (e.g. off-the-shelf vs fine-tuned) side by side. Listens on "
        f'{DEFAULT_HOST} only unless --allow-remote. Needs: pip install "deepfeat[serve]". A server\'s '
        "token comes from $DEEPFEAT_MILVUS_TOKEN or $MILVUS_TOKEN.",
    )
    p.add_argument(
        "--uri",
        default=None,
        help="Milvus Lite .db path or http(s)://host:19530 (default: $DEEPFEAT_MILVUS_URI or deepfeat.db)",
    )
    p.add_argument("--collection", "-c", required=True, help="collection (or alias) to search")
    p.add_argument("--bundle", required=True, help="the model bundle that filled the collection")
    p.add_argument("--label", default=None, help="panel title (default: the collection name)")
    p.add_argument(
        "--image-root",
        default=None,
        help="folder the images are served from (default: the working directory): relative image paths are "
        "relative to it, and no file outside it is served, whether the stored path is absolute, uses .. or a "
        "symlink",
    )
    g = p.add_argument_group("compare: a second panel beside the first")
    g.add_argument("--compare-uri", default=None, help="database of the second collection (default: --uri)")
    g.add_argument("--compare-collection", default=None, help="second collection")
    g.add_argument("--compare-bundle", default=None, help="the bundle that filled the second collection")
    g.add_argument("--compare-label", default=None, help="second panel title (default: its collection name)")
    g.add_argument(
        "--compare-image-root", default=None, help="image root of the second collection (default: --image-root)"
    )
    s = p.add_argument_group("server")
    s.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on (default {DEFAULT_HOST}; anything but loopback needs --allow-remote)",
    )
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    s.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback --host: anyone who "
        "reaches the port sees the collection's images (there is no login)",
    )
    s.add_argument(
        "--max-upload-mb",
        type=float,
        default=MAX_UPLOAD_BYTES / 2**20,
        help=f"largest query upload in MB (default {MAX_UPLOAD_BYTES // 2**20})",
    )
    p.set_defaults(handler=_cmd_serve)
