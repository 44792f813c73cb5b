"""One connector for every Milvus: Milvus Lite (a local ``.db`` path) or a server (``http(s)://``).

:class:`MilvusConnector` wraps :class:`pymilvus.MilvusClient` and keeps the Milvus Lite traps in one
place: the ``.db`` directory is locked by one process (a lock conflict becomes a
:class:`~deepfeat.finetune.errors.ConnectorError` that names the lock and its holder), a collection must
be loaded again after reopening, and transient server errors are retried with bounded exponential
back-off. The token comes from the environment or a file and never reaches a log, a repr or an error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from deepfeat.finetune.data.contract import file_kind
from deepfeat.finetune.errors import ConnectorError
from deepfeat.finetune.redaction import mask_uri, redact, uri_secrets

log = logging.getLogger(__name__)

T = TypeVar("T")

TOKEN_ENV_VARS = ("DEEPFEAT_MILVUS_TOKEN", "MILVUS_TOKEN")
TOKEN_FILE_ENV_VAR = "DEEPFEAT_MILVUS_TOKEN_FILE"
URI_ENV_VAR = "DEEPFEAT_MILVUS_URI"
DEFAULT_URI = "deepfeat.db"
_SERVER_SCHEMES = ("http://", "https://", "tcp://", "grpc://", "unix:")
_LITE_LOCK = "LOCK"


def resolve_token(token: str | None = None, token_file: str | os.PathLike[str] | None = None) -> str | None:
    """The Milvus token: the argument, else ``token_file``, else ``$DEEPFEAT_MILVUS_TOKEN``,
    ``$MILVUS_TOKEN``, else the file named by ``$DEEPFEAT_MILVUS_TOKEN_FILE``; ``None`` when none is set.

    Raises:
        ConnectorError: a token file was named but cannot be read or is empty.
    """
    if token:
        return token
    file = token_file or os.environ.get(TOKEN_FILE_ENV_VAR)
    if file is None:
        for name in TOKEN_ENV_VARS:
            if os.environ.get(name):
                return os.environ[name]
        return None
    path = Path(file).expanduser()
    if not path.is_file():  # a FIFO would block the read forever; a folder or a missing file says what it is
        raise ConnectorError(
            f"the Milvus token file {os.fspath(file)!r} is {file_kind(path)}, not a regular file; "
            f"fix the path or set ${TOKEN_ENV_VARS[0]} instead"
        )
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConnectorError(
            f"cannot read the Milvus token file {os.fspath(file)!r} ({exc.strerror or exc}); "
            f"fix the path or set ${TOKEN_ENV_VARS[0]} instead"
        ) from exc
    except UnicodeDecodeError as exc:
        raise ConnectorError(
            f"the Milvus token file {os.fspath(file)!r} is not UTF-8 text (byte {exc.start}); write the token "
            f"(user:password or an API key) into it as plain text"
        ) from exc
    if not text:
        raise ConnectorError(
            f"the Milvus token file {os.fspath(file)!r} is empty; write the token (user:password or an API key) into it"
        )
    return text


def redact_uri(uri: str) -> str:
    """``uri`` safe for logs and errors: :func:`deepfeat.finetune.redaction.mask_uri` (the whole
    userinfo up to the last ``@``, the query string and the token values hidden)."""
    return mask_uri(uri)


def is_local_uri(uri: str) -> bool:
    """True for a Milvus Lite path (anything that is not a server URI)."""
    return not uri.startswith(_SERVER_SCHEMES)


def _is_transient(exc: BaseException) -> bool:
    """Connection-level failures worth retrying (server restarting, network blip, rate limit)."""
    from pymilvus.exceptions import ConnectError, MilvusException, MilvusUnavailableException

    if isinstance(exc, ConnectError | MilvusUnavailableException):
        return True
    if isinstance(exc, MilvusException):
        text = str(exc).lower()
        return bool(
            getattr(exc, "code", None) in (2, 8)
            or "unavailable" in text
            or "fail connecting" in text
            or "deadline exceeded" in text
            or "connection refused" in text
            or "rate limit" in text
        )
    try:
        import grpc
    except ImportError:  # pragma: no cover - grpc is a pymilvus dependency
        return False
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        return code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    return False


def _lock_holder(lock_file: Path) -> int | None:
    """PID holding an flock on ``lock_file`` (from /proc/locks on Linux), else None."""
    try:
        inode = lock_file.stat().st_ino
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            # "1: FLOCK  ADVISORY  WRITE 12345 08:01:1234567 0 EOF"
            if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(inode):
                return int(parts[4])
    except (OSError, ValueError):
        return None
    return None


def _lite_lock_error(path: Path) -> ConnectorError | None:
    """A ConnectorError when another process holds the Milvus Lite lock of ``path``, else None."""
    lock_file = path / _LITE_LOCK
    if not lock_file.is_file():
        return None
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: Milvus Lite reports the lock itself
        return None
    try:
        fd = os.open(lock_file, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except OSError:
        pid = _lock_holder(lock_file)
        who = f"process {pid}" if pid is not None else "another process"
        return ConnectorError(
            f"the Milvus Lite database {str(path)!r} is locked by {who} (lock file {str(lock_file)!r}): "
            f"Milvus Lite lets one process open a .db at a time. Stop that process (a running 'deepfeat "
            f"load/sync', a notebook or a server holding it) or wait for it to finish, then retry; for "
            f"concurrent access use a Milvus server URI (http://host:19530)"
        )
    finally:
        os.close(fd)


def lite_served_here(path: Path) -> bool:
    """Whether this process already serves ``path`` (a second client then shares that server)."""
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:
        return False
    servers = getattr(server_manager_instance, "_servers", {})
    return str(path.resolve()) in servers or os.path.abspath(path) in servers


@dataclass(frozen=True)
class TLSOptions:
    """TLS files for an ``https://`` server, passed through to pymilvus as given."""

    server_pem_path: str | None = None
    ca_pem_path: str | None = None
    client_pem_path: str | None = None
    client_key_path: str | None = None
    server_name: str | None = None

    def kwargs(self) -> dict[str, str]:
        """The non-empty options as pymilvus keyword arguments."""
        return {k: v for k, v in vars(self).items() if v}


@dataclass
class MilvusConnector:
    """A connection to Milvus Lite or a Milvus server, with retries and clear errors.

    Use :func:`connect`. ``uri`` is a local path ending in ``.db`` (Milvus Lite, created if missing) or
    ``http(s)://host:19530`` (standalone, cluster, Zilliz Cloud). The token is read by
    :func:`resolve_token`; it is never logged and shows as ``***`` in the repr.

    Args:
        uri: where Milvus is.
        token: ``user:password`` or an API key; ``None`` reads the environment (see :func:`resolve_token`).
        db_name: the database on a server (``""`` for the default one).
        timeout: seconds for one RPC.
        tls: TLS files for ``https://``.
        retries: attempts for an operation that fails with a connection-level error.
        backoff: first back-off in seconds; doubled per attempt, capped at ``max_backoff``.
    """

    uri: str
    token: str | None = field(default=None, repr=False)
    db_name: str = ""
    timeout: float | None = 60.0
    tls: TLSOptions = field(default_factory=TLSOptions)
    retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 10.0
    _client: Any = field(default=None, init=False, repr=False)
    _loaded: set[str] = field(default_factory=set, init=False, repr=False)
    _version: str | None = field(default=None, init=False, repr=False)

    def __repr__(self) -> str:
        token = "***" if self.token else None
        return f"MilvusConnector(uri={redact_uri(self.uri)!r}, token={token}, db_name={self.db_name!r})"

    @property
    def is_lite(self) -> bool:
        """True for Milvus Lite (a local ``.db`` directory)."""
        return is_local_uri(self.uri)

    @property
    def _secrets(self) -> tuple[str | None, ...]:
        """What an error message must never echo: the token and the URI's password, in every piece."""
        return (self.token, *uri_secrets(self.uri))

    @property
    def display_uri(self) -> str:
        """The URI without credentials, for messages."""
        return redact_uri(self.uri)

    @property
    def client(self) -> Any:
        """The underlying :class:`pymilvus.MilvusClient`, opened on first use."""
        if self._client is None:
            self._client = self._open()
        return self._client

    def _open(self) -> Any:
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException

        if self.is_lite:
            path = Path(self.uri).expanduser()
            if path.suffix != ".db":
                raise ConnectorError(
                    f"a Milvus Lite path must end in '.db', got {self.uri!r}; use e.g. "
                    f"{str(path.with_suffix('.db'))!r}, or a server URI http://host:19530"
                )
            if path.exists() and not path.is_dir():
                raise ConnectorError(
                    f"{str(path)!r} is a file, but Milvus Lite 3 keeps a .db as a directory: "
                    f"this is a database of an older Milvus Lite or not one at all; choose "
                    f"another path"
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            if not lite_served_here(path):
                locked = _lite_lock_error(path)
                if locked is not None:
                    raise locked
            try:
                _forget_cached_schemas()
                with _QUIET:
                    return MilvusClient(str(path))
            except MilvusException as exc:
                locked = _lite_lock_error(path)
                if locked is not None:
                    raise locked from exc
                raise ConnectorError(
                    f"cannot open the Milvus Lite database {str(path)!r}: {exc}; check that "
                    f"the directory is writable and that milvus-lite is installed "
                    f"(pip install milvus-lite)"
                ) from exc
        kwargs: dict[str, Any] = dict(self.tls.kwargs())
        if self.uri.startswith("https://"):
            kwargs["secure"] = True
        last: BaseException | None = None
        for attempt in range(self.retries):
            try:
                with _QUIET:
                    return MilvusClient(
                        self.uri, token=self.token or "", db_name=self.db_name, timeout=self.timeout, **kwargs
                    )
            except Exception as exc:
                if not _is_transient(exc) and "fail connecting" not in str(exc).lower():
                    raise ConnectorError(
                        f"cannot connect to Milvus at {self.display_uri}: {_clean(exc, self._secrets)}; check "
                        f"the URI, the token (${TOKEN_ENV_VARS[0]}) and TLS options"
                    ) from exc
                last = exc
                if attempt + 1 < self.retries:
                    self._sleep(attempt, "connect")
        raise ConnectorError(
            f"Milvus at {self.display_uri} is unreachable after {self.retries} attempts "
            f"({_clean(last, self._secrets)}); nothing was written through this connection. Start the server or "
            f"fix the URI, then re-run the same command"
        ) from last

    def _sleep(self, attempt: int, what: str) -> None:
        delay = min(self.max_backoff, self.backoff * (2**attempt))
        log.warning(
            "Milvus %s at %s failed (attempt %d of %d); retrying in %.1fs",
            what,
            self.display_uri,
            attempt + 1,
            self.retries,
            delay,
        )
        time.sleep(delay)

    def call(self, what: str, fn: Callable[..., T], *args: Any, on_give_up: str = "", **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` retrying connection-level errors with bounded back-off.

        Args:
            what: the operation, for messages.
            on_give_up: a sentence added to the error once the retries are spent (e.g. what is already
                durably written and how to resume).

        Raises:
            ConnectorError: retries spent, or a non-transient Milvus error.
        """
        from pymilvus.exceptions import MilvusException

        last: BaseException | None = None
        for attempt in range(max(1, self.retries)):
            try:
                with _QUIET:
                    return fn(*args, **kwargs)
            except Exception as exc:
                if not _is_transient(exc):
                    if isinstance(exc, MilvusException):
                        raise ConnectorError(
                            f"Milvus refused {what} at {self.display_uri}: {_clean(exc, self._secrets)}"
                            + (f". {on_give_up}" if on_give_up else "")
                        ) from exc
                    raise
                last = exc
                if attempt + 1 < self.retries:
                    self._sleep(attempt, what)
        raise ConnectorError(
            f"{what} failed: Milvus at {self.display_uri} is unreachable after {self.retries} "
            f"attempts ({_clean(last, self._secrets)})" + (f". {on_give_up}" if on_give_up else "")
        ) from last

    def close(self) -> None:
        """Close the client (Milvus Lite keeps serving the .db for other clients of this process)."""
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
            self._loaded.clear()

    def release_lite(self) -> None:
        """Close and stop this process's Milvus Lite server for the path, releasing the lock."""
        self.close()
        if self.is_lite:
            with contextlib.suppress(ImportError):
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(str(Path(self.uri).expanduser()))
            _forget_cached_schemas()

    def __enter__(self) -> MilvusConnector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------
    # collection helpers used by load, sync and search

    def server_version(self) -> str:
        """The server's version string (``milvus_lite-3.2.2``, ``v2.4.9``, ...)."""
        if self._version is None:
            self._version = str(self.call("get_server_version", self.client.get_server_version))
        return self._version

    def version_at_least(self, major: int, minor: int) -> bool:
        """True for Milvus Lite or a server of at least ``major.minor`` (unknown versions count as new)."""
        if self.is_lite:
            return True
        m = re.search(r"(\d+)\.(\d+)", self.server_version())
        return m is None or (int(m.group(1)), int(m.group(2))) >= (major, minor)

    def has_collection(self, name: str) -> bool:
        """Whether a collection (or an alias) of this name exists."""
        return bool(self.call("has_collection", self.client.has_collection, name))

    def resolve_alias(self, name: str) -> str:
        """The collection ``name`` points at: itself for a collection, the target for an alias."""
        if name not in self.list_aliases():
            return name
        desc = self.call("describe_alias", self.client.describe_alias, name)
        return str(desc.get("collection_name") or name)

    def list_aliases(self, collection: str | None = None) -> list[str]:
        """Aliases (of one collection, or all)."""
        res = self.call(
            "list_aliases",
            self.client.list_aliases,
            **({"collection_name": collection} if collection else {}),
        )
        return list(res.get("aliases", []) if isinstance(res, dict) else res)

    def describe(self, name: str) -> dict[str, Any]:
        """``describe_collection`` as a plain dict.

        Raises:
            ConnectorError: no such collection (with the ones that exist).
        """
        if not self.has_collection(name):
            existing = self.call("list_collections", self.client.list_collections)
            raise ConnectorError(
                f"no collection {name!r} at {self.display_uri}; existing: {sorted(existing)}. "
                f"Create it with 'deepfeat load' or 'deepfeat sync'"
            )
        return dict(self.call("describe_collection", self.client.describe_collection, name))

    def ensure_loaded(self, name: str) -> None:
        """Load ``name`` into memory if it is not (needed after reopening a Milvus Lite .db)."""
        if name in self._loaded:
            return
        state = self.call("get_load_state", self.client.get_load_state, name)
        text = str(state.get("state") if isinstance(state, dict) else state)
        if "Loaded" not in text or "NotLoad" in text:
            self.call("load_collection", self.client.load_collection, name)
        self._loaded.add(name)

    def forget_loaded(self, name: str) -> None:
        """Mark ``name`` as possibly released (after an index rebuild)."""
        self._loaded.discard(name)

    def count(self, name: str) -> int:
        """Exact row count (``count(*)`` with strong consistency)."""
        self.ensure_loaded(name)
        res = self.call(
            "count",
            self.client.query,
            name,
            filter="",
            output_fields=["count(*)"],
            consistency_level="Strong",
        )
        return int(res[0]["count(*)"])

    def flush(self, name: str) -> None:
        """Seal what was written so far into persistent segments."""
        self.call("flush", self.client.flush, name)

    def upsert(self, name: str, rows: list[dict[str, Any]], *, on_give_up: str = "") -> None:
        """Upsert rows (retrying connection errors)."""
        self.call("upsert", self.client.upsert, name, rows, on_give_up=on_give_up)

    def delete(self, name: str, pks: Sequence[str], *, chunk: int = 1000) -> int:
        """Delete rows by primary key, in chunks; returns how many keys were sent."""
        for start in range(0, len(pks), chunk):
            self.call("delete", self.client.delete, name, ids=list(pks[start : start + chunk]))
        return len(pks)

    def iter_rows(
        self, name: str, fields: Sequence[str], *, filter: str = "", batch_size: int = 2000
    ) -> Iterator[dict[str, Any]]:
        """Every row's ``fields`` (a query iterator: no 16384-row limit)."""
        self.ensure_loaded(name)
        quiet = _DropLogRecord(_ITERATOR_LOGGER, "failed to get mvccTs") if self.is_lite else contextlib.nullcontext()
        with quiet:
            yield from self._iter_rows(name, fields, filter=filter, batch_size=batch_size)

    def _iter_rows(self, name: str, fields: Sequence[str], *, filter: str, batch_size: int) -> Iterator[dict[str, Any]]:
        it = self.call(
            "query_iterator",
            self.client.query_iterator,
            name,
            batch_size=batch_size,
            filter=filter,
            output_fields=list(fields),
        )
        try:
            while True:
                page = self.call("query_iterator.next", it.next)
                if not page:
                    return
                yield from page
        finally:
            with contextlib.suppress(Exception):
                it.close()

    def switch_alias(self, alias: str, collection: str) -> str | None:
        """Point ``alias`` at ``collection`` (atomically on the server); returns the previous target."""
        previous = self.resolve_alias(alias) if alias in self.list_aliases() else None
        if previous is None:
            if alias in self.call("list_collections", self.client.list_collections):
                raise ConnectorError(
                    f"{alias!r} is a collection, not an alias, so it cannot be switched to "
                    f"{collection!r}. Choose an alias name that is no collection (e.g. "
                    f"'{alias}_live') and point clients at it"
                )
            self.call("create_alias", self.client.create_alias, collection, alias)
        elif previous != collection:
            self.call("alter_alias", self.client.alter_alias, collection, alias)
        log.info("alias %s -> %s (was %s)", alias, collection, previous)
        return previous


_ITERATOR_LOGGER = "pymilvus.client.iterator.query_iterator"


class _DropLogRecord(logging.Filter):
    """Drops one known-harmless pymilvus warning while active (Milvus Lite has no mvcc timestamps, so
    every query iterator warns that it falls back to a client-side timestamp, which is fine there)."""

    def __init__(self, logger: str, text: str) -> None:
        super().__init__()
        self.logger = logging.getLogger(logger)
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()

    def __enter__(self) -> None:
        self.logger.addFilter(self)

    def __exit__(self, *exc: object) -> None:
        self.logger.removeFilter(self)


#: Loggers whose error records accompany an exception that deepfeat converts into its own one-line error:
#: pymilvus' ``_log_rpc_error`` (a traceback per failed RPC) and Milvus Lite's in-process servicer
#: (``logger.exception`` for a corrupt .db, a bad filter, ...).
_CONVERTED_LOGGERS = ("pymilvus.decorators", "milvus_lite.adapter.grpc.servicer")


class _QuietConvertedErrors(logging.Filter):
    """While any deepfeat call is in flight, demote the error records of :data:`_CONVERTED_LOGGERS` to one
    DEBUG line of deepfeat's logger (seen with ``-v``/``--debug``); the user gets deepfeat's error instead.

    Reentrant and process-wide: Milvus Lite's servicer logs from gRPC threads, not the calling one. Outside
    deepfeat's calls pymilvus logs as it always does.
    """

    def __init__(self) -> None:
        super().__init__()
        self._depth = 0
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        first = record.getMessage().strip().splitlines()[0] if record.getMessage().strip() else ""
        log.debug("quieted %s %s: %s", record.name, record.levelname, redact(first[:300]))
        return False

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                for name in _CONVERTED_LOGGERS:
                    logging.getLogger(name).addFilter(self)
            self._depth += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                for name in _CONVERTED_LOGGERS:
                    logging.getLogger(name).removeFilter(self)


_QUIET = _QuietConvertedErrors()


def _forget_cached_schemas() -> None:
    """Drop pymilvus' process-wide schema cache (keyed by endpoint, i.e. ``127.0.0.1:<port>``).

    Milvus Lite serves each database on a free local port; once one is released, another database's
    server can get the same port and would inherit the first one's cached schemas (seen: an upsert
    refused for a field that only the other database's collection had). Clearing is cheap: pymilvus
    fetches a schema again on next use.
    """
    with contextlib.suppress(Exception):  # a pymilvus without this cache needs nothing
        from pymilvus.client.cache import GlobalCache

        for region in (GlobalCache.schema, GlobalCache.collection_ts):
            with region._lock:
                region._cache.clear()


def _clean(exc: BaseException | None, secrets: tuple[str | None, ...] = ()) -> str:
    """A one-line description of a pymilvus error (its message, not its repr)."""
    if exc is None:
        return "no error recorded"
    message = getattr(exc, "message", None) or str(exc)
    return redact(" ".join(str(message).split())[:500], secrets)


def connect(
    uri: str | None = None,
    token: str | None = None,
    *,
    token_file: str | os.PathLike[str] | None = None,
    db_name: str = "",
    timeout: float | None = 60.0,
    tls: TLSOptions | None = None,
    retries: int = 5,
    backoff: float = 0.5,
) -> MilvusConnector:
    """Open a :class:`MilvusConnector`.

    Args:
        uri: a local ``*.db`` path (Milvus Lite, the default: ``$DEEPFEAT_MILVUS_URI`` or ``deepfeat.db``)
            or ``http(s)://host:19530``.
        token: the token; ``None`` reads ``token_file``, ``$DEEPFEAT_MILVUS_TOKEN``, ``$MILVUS_TOKEN`` or
            the file in ``$DEEPFEAT_MILVUS_TOKEN_FILE``. Ignored for Milvus Lite.
        token_file: a file holding the token (keeps it out of the process list and shell history).

    The connection is opened lazily; errors (lock held, server unreachable) surface on first use as
    :class:`ConnectorError`. Call ``.client`` to open it at once.
    """
    uri = uri or os.environ.get(URI_ENV_VAR) or DEFAULT_URI
    local = is_local_uri(uri)
    resolved = None if local else resolve_token(token, token_file)
    if local and (token or token_file):
        log.info("a token was given for the local Milvus Lite path %s; it is not needed and not used", uri)
    if not local and not uri.startswith("https://") and tls is not None and tls.kwargs():
        raise ConnectorError(
            f"TLS options were given for {redact_uri(uri)}, which is not https://; use an "
            f"https:// URI or drop the TLS options"
        )
    for option, value in (tls.kwargs() if tls is not None else {}).items():
        if option.endswith("_path") and not Path(value).expanduser().is_file():  # a FIFO would block the TLS setup
            raise ConnectorError(
                f"the TLS file {value!r} ({option.removesuffix('_path').replace('_', ' ')}) is "
                f"{file_kind(Path(value).expanduser())}, not a regular file; name the PEM file"
            )
    return MilvusConnector(
        uri=uri,
        token=resolved,
        db_name=db_name,
        timeout=timeout,
        tls=tls or TLSOptions(),
        retries=retries,
        backoff=backoff,
    )
