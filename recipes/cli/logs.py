"""What reaches the user's terminal: deepfeat's own lines, and other packages' only with ``-v`` / ``--debug``.

pymilvus prints ``[ERROR][_log_rpc_error]`` lines with a traceback (through its own handler) before deepfeat's
one-line error; Milvus Lite and gRPC log server-side tracebacks; Lightning sets its loggers to INFO and torch
warns that ``LeafSpec`` is deprecated on every training command. Quiet (no ``-v``), those are silenced here, in
the CLI process only: the library never changes another package's logging.
"""

from __future__ import annotations

import logging
import os
import warnings

__all__ = ["FOREIGN_LOGGERS", "configure_logging", "quiet_grpc"]

#: Loggers of other packages that print their own view of an error deepfeat reports in one line.
FOREIGN_LOGGERS = ("pymilvus", "milvus_lite", "grpc")
_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")


def quiet_grpc() -> None:
    """Quiet gRPC's C core before grpc is imported (a user's own setting of these variables wins).

    ``GRPC_VERBOSITY=ERROR`` drops its INFO/WARNING lines; without fork support gRPC no longer prints
    ``Other threads are currently calling into gRPC, skipping fork() handlers`` when DataLoader workers fork.
    """
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


def configure_logging(verbose: int, *, debug: bool = False, trains: bool = False, milvus: bool = False,
                      show_info: bool = False) -> None:
    """Set up logging for one CLI command.

    Args:
        verbose: 0 warnings of deepfeat only; 1 (``-v``) info, and other packages' warnings; 2 (``-vv``) debug.
        debug: ``--debug``: other packages' messages are shown as with ``-v``.
        trains: the command trains: Lightning is imported first, as it sets its own log levels on import.
        milvus: the command talks to Milvus: pymilvus is imported first, as it configures its logger on import.
        show_info: deepfeat's INFO lines even without ``-v`` (the training commands report their steps).
    """
    level = logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 or show_info else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    quiet = verbose == 0 and not debug
    if trains:
        import lightning.pytorch  # noqa: F401  (sets its loggers on import; quieted below)
    if milvus:
        import pymilvus  # noqa: F401  (dictConfig of its own logger on import; quieted below)
    if verbose < 2:
        for name in _LIGHTNING_LOGGERS:
            logging.getLogger(name).setLevel(max(level, logging.WARNING))
    if quiet:
        for name in FOREIGN_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
