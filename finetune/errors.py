"""Errors raised by deepfeat.

Every message says what was wrong, what was received and how to fix it. The CLI prints a
:class:`DeepfeatError` as one line and exits with code 2 instead of showing a stack trace.
"""

from __future__ import annotations

from pathlib import Path


class DeepfeatError(Exception):
    """Base class of every user-facing deepfeat error."""


class DataError(DeepfeatError, ValueError):
    """A manifest, a record table, a split or a data folder is not usable as given."""


class ImageDecodeError(DeepfeatError, ValueError):
    """One image could not be decoded into pixels.

    Args:
        source: the file path or a short description of the in-memory source.
        reason: what was wrong with it, in words a user can act on.
    """

    def __init__(self, source: str | Path, reason: str) -> None:
        self.source = str(source)
        self.reason = reason
        super().__init__(f"cannot read image {self.source!r}: {reason}")


class ModelError(DeepfeatError, ValueError):
    """Weights, a checkpoint or a model bundle are missing, unsafe or of another architecture."""


class MismatchError(DeepfeatError, ValueError):
    """A model bundle and a collection (or two bundles) disagree on dim, metric or preprocessing."""


class ConnectorError(DeepfeatError, RuntimeError):
    """Milvus could not be reached or refused an operation."""


class MissingExtraError(DeepfeatError, ImportError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, extra: str, what: str) -> None:
        super().__init__(f"{what} needs the package {package!r}, which is not installed; "
                         f'install it with: pip install "deepfeat[{extra}]"')
