"""What keeps the search page safe for whoever can reach its port.

* It listens on ``127.0.0.1`` unless ``--allow-remote`` is given (:func:`check_host`), and answers
  only requests whose ``Host`` is a loopback name (:func:`allowed_hosts_for`; a DNS-rebinding page
  cannot read it through the browser).
* Request bodies above the upload limit get 413 before anything parses them (:class:`BodyLimit`).
* Every response carries a strict content-security policy (:class:`SecurityHeaders`).
* An image is served only from inside the image root (:func:`resolve_image_path`): a stored path,
  absolute or relative, that resolves (symlinks followed) outside it is refused, and no error names a
  path outside the root. A record of a Hugging Face ``save_to_disk`` folder (no file, an ``hf_dataset``
  folder and row) follows the same rule (:func:`resolve_hf_dataset`): its folder, named by the collection
  row, must lie inside the image root too, so a row cannot make the page open a dataset elsewhere.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import TYPE_CHECKING

from deepfeat.finetune.errors import DeepfeatError

from .requests import NotFoundError

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
#: Largest upload, in bytes (HTTP 413 above it).
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
#: Host names a loopback-only server answers to (DNS-rebinding guard).
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")

_OUTSIDE_DATASET = (
    "the Hugging Face dataset folder stored for this record is outside the image root, so its image is not "
    "served; start deepfeat serve with --image-root naming a folder that holds the dataset's save_to_disk folder"
)
_OUTSIDE = (
    "the image path stored for this record is outside the image root, so it is not served; start deepfeat "
    "serve with --image-root naming the folder that holds the collection's images"
)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback address (``127.0.0.0/8``, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback ``host`` unless ``allow_remote``.

    Raises:
        DeepfeatError: the host is not loopback and ``allow_remote`` is False.
    """
    if allow_remote or is_loopback(host):
        return
    raise DeepfeatError(
        f"refusing to serve on {host!r}: the search page has no login and shows the collection's images to "
        f"anyone who can reach the port. Use --host {DEFAULT_HOST} (the default) and an SSH tunnel, or pass "
        f"--allow-remote if every machine on that network may see them"
    )


def allowed_hosts_for(host: str, allow_remote: bool) -> list[str] | None:
    """Host-header names the server answers to; ``None`` (any) with ``allow_remote``."""
    if allow_remote:
        return None
    names = list(LOOPBACK_NAMES)
    bare = host.strip("[]")
    extra = f"[{bare}]" if ":" in bare else bare.lower()
    if extra not in names:
        names.append(extra)
    return names


# --------------------------------------------------------------------------------------------------
# image files: inside the image root only


def image_root_of(image_root: str | Path | None) -> Path:
    """The image root as served from: ``image_root`` (or the working directory), symlinks resolved."""
    return Path(image_root or ".").expanduser().resolve()


def locate_image(stored: str, root: Path) -> Path | None:
    """The file a stored ``path`` value names, resolved, when it lies inside ``root``; else ``None``.

    A relative value is taken relative to ``root``; an absolute one must lie inside it too. Symlinks
    are followed before the check, so ``..`` and a link out of the root are both outside. ``root``
    must already be resolved (:func:`image_root_of`). The file need not exist.
    """
    if not stored:
        return None
    try:
        path = (root / Path(stored).expanduser()).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte: not a file we serve
        return None
    return path if path.is_relative_to(root) else None


def shown_path(stored: str, root: Path) -> str:
    """The stored path as the page may show it: relative to ``root``, or ``""`` when outside it."""
    path = locate_image(stored, root)
    return path.relative_to(root).as_posix() if path is not None else ""


def resolve_image_path(stored: str, image_root: str | Path | None) -> Path:
    """The file a stored ``path`` value names, inside ``image_root`` (default: the working directory).

    Relative values are relative to the root; absolute ones must lie inside it; symlinks are resolved
    first, so neither ``../`` nor a link may leave it. Error messages never name a path outside the
    root (the page may be seen by others than the operator).

    Raises:
        NotFoundError: no path stored, a path outside the root, or no such file.
    """
    if not stored:
        raise NotFoundError(
            "this record has no image file (an in-memory image, e.g. Fashion-MNIST); the page shows a placeholder"
        )
    root = image_root_of(image_root)
    path = locate_image(stored, root)
    if path is None:
        raise NotFoundError(_OUTSIDE)
    if not path.is_file():
        raise NotFoundError(
            f"image file {path.relative_to(root).as_posix()!r} is not in the image root (moved or deleted since "
            f"it was loaded, or not a regular file); re-sync the collection"
            + ("" if image_root else ", or pass --image-root naming the folder that holds the images")
        )
    return path


def resolve_hf_dataset(stored: str, image_root: str | Path | None) -> Path:
    """The ``save_to_disk`` folder a stored ``hf_dataset`` value names, inside ``image_root`` (default: the working
    directory): the rule of :func:`resolve_image_path`, for a folder (relative values are relative to the root,
    absolute ones must lie inside it, symlinks resolved first). Errors never name a folder outside the root.

    Raises:
        NotFoundError: no folder stored, a folder outside the root, or no saved dataset there (no ``state.json``).
    """
    if not stored:
        raise NotFoundError("this record has no image file and no Hugging Face dataset folder; the page shows a "
                            "placeholder")
    root = image_root_of(image_root)
    folder = locate_image(stored, root)
    if folder is None:
        raise NotFoundError(_OUTSIDE_DATASET)
    if not (folder / "state.json").is_file():
        raise NotFoundError(
            f"the Hugging Face dataset folder {folder.relative_to(root).as_posix()!r} is not a save_to_disk folder "
            f"any more (moved or deleted since it was loaded); save the dataset there again or re-load the collection"
        )
    return folder


# --------------------------------------------------------------------------------------------------
# ASGI middleware


class BodyLimit:
    """Refuse request bodies above ``limit`` bytes with 413, before anything parses them.

    The declared ``Content-Length`` is checked first; a body without one (chunked) is counted as it
    arrives.
    """

    class _Exceeded(Exception):
        pass

    def __init__(self, app: ASGIApp, limit: int, file_limit: int) -> None:
        self.app = app
        self.limit = limit
        self.file_limit = file_limit  # what the message names: the body limit adds the form's overhead

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            {"detail": f"the upload is larger than the limit of {self.file_limit / 2**20:g} MB; upload a smaller image"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._Exceeded
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except self._Exceeded:
            if not started:
                await self._refuse(send)


class SecurityHeaders:
    """Headers that keep the page self-contained: no outside scripts, no framing, no sniffing."""

    CSP = (
        "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    )

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                headers += [
                    (b"content-security-policy", self.CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers if scope["type"] == "http" else send)
