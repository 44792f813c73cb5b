"""The Milvus connection arguments every command shares: :func:`add_connection_args` and :func:`connect_from_args`.

The token is never a command-line argument (it would show in the process list and the shell history): it comes
from ``$DEEPFEAT_MILVUS_TOKEN``, ``$MILVUS_TOKEN`` or ``--token-file``.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from deepfeat.recipes.cli.arguments import int_at_least, positive_float

if TYPE_CHECKING:
    from deepfeat.connectors.client import MilvusConnector

__all__ = ["add_connection_args", "connect_from_args"]


def add_connection_args(parser: argparse.ArgumentParser, *, collection: bool = False) -> None:
    """Add the ``Milvus connection`` options (``--uri``, ``--token-file``, TLS, retries) to ``parser``.

    Args:
        parser: the command's parser.
        collection: also add a required ``--collection`` / ``-c`` (the collection or alias to work on).
    """
    if collection:
        parser.add_argument("--collection", "-c", required=True, help="the collection (or alias) to work on")
    g = parser.add_argument_group("Milvus connection")
    g.add_argument("--uri", default=None,
                   help="a Milvus Lite path ending in .db, or http(s)://host:19530 (default: $DEEPFEAT_MILVUS_URI "
                        "or deepfeat.db)")
    g.add_argument("--token-file", default=None,
                   help="file holding the token (default: $DEEPFEAT_MILVUS_TOKEN, $MILVUS_TOKEN)")
    g.add_argument("--db-name", default="", help="database on a server (default: the default database)")
    g.add_argument("--retries", type=int_at_least(1), default=5,
                   help="attempts per operation on connection errors, with exponential back-off (default 5)")
    g.add_argument("--timeout", type=positive_float, default=60.0, help="seconds for one request (default 60)")
    g.add_argument("--server-pem", default=None, help="TLS: server certificate (one-way TLS)")
    g.add_argument("--ca-pem", default=None, help="TLS: CA certificate (two-way TLS)")
    g.add_argument("--client-pem", default=None, help="TLS: client certificate (two-way TLS)")
    g.add_argument("--client-key", default=None, help="TLS: client key (two-way TLS)")
    g.add_argument("--server-name", default=None, help="TLS: expected server name")
    parser.set_defaults(uses_milvus=True)


def connect_from_args(args: argparse.Namespace) -> MilvusConnector:
    """Open the connector the options of :func:`add_connection_args` describe (lazily: errors surface on use)."""
    from deepfeat.connectors.client import TLSOptions, connect  # the connectors package imports torch

    tls = TLSOptions(server_pem_path=args.server_pem, ca_pem_path=args.ca_pem, client_pem_path=args.client_pem,
                     client_key_path=args.client_key, server_name=args.server_name)
    return connect(args.uri, token_file=args.token_file, db_name=args.db_name, tls=tls, retries=args.retries,
                   timeout=args.timeout)
