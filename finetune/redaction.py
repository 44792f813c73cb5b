"""Credentials never reach a message, a log line, a card or a report: one masking rule for all of them.

:func:`mask_uri` is for a URI about to be shown (a connector's ``display_uri``, a recipe's result);
:func:`redact` is for any text that may hold one (an exception message, a config value written to a
card). Both hide the whole *userinfo* of a URI, everything between ``scheme://`` and the **last**
``@`` of the authority, so a password containing ``@``, ``:`` or ``/`` leaks no fragment
(``http://root:pa@SECRET@host:1`` -> ``http://***@host:1``), and both drop query strings and the
values of the Milvus token environment variables.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

__all__ = ["MASK", "SECRET_ENV_VARS", "mask_uri", "redact", "uri_secrets"]

#: What a hidden credential is replaced by.
MASK = "***"

#: Environment variables that hold the Milvus token: their values are hidden wherever they appear.
SECRET_ENV_VARS: tuple[str, ...] = ("DEEPFEAT_MILVUS_TOKEN", "MILVUS_TOKEN")

# scheme://userinfo@ where userinfo runs to the LAST '@' before whitespace or a quote: greedy on purpose,
# a password may hold '@', ':' or '/'; masking a path that holds '@' too is the safe mistake.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^\s'\"<>]*@")
# ?token=... / &password=... in any URL-like text
_QUERY_SECRET = re.compile(r"(?i)(?P<key>[?&;](?:token|password|passwd|pwd|secret|api[_-]?key|access[_-]?key)=)"
                           r"[^&\s'\"<>]*")


def mask_uri(uri: str) -> str:
    """``uri`` safe to show: its userinfo (up to the last ``@``) as ``***``, its query string and fragment
    dropped. A local path (Milvus Lite) comes back unchanged unless it holds a secret value.

    >>> mask_uri("http://root:pa@SECRET/x@127.0.0.1:19530/db?token=abc")
    'http://***@127.0.0.1:19530/db'
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return redact(uri)
    at = rest.rfind("@")
    if at >= 0:
        rest = f"{MASK}@{rest[at + 1:]}"
    rest = re.split(r"[?#]", rest, maxsplit=1)[0]
    return redact(f"{scheme}{sep}{rest}")


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with every URI userinfo, every ``token=``/``password=`` query value, the values of
    :data:`SECRET_ENV_VARS` and the given ``secrets`` replaced by ``***``."""
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m.group('key')}{MASK}", text)
    values = [os.environ.get(name) for name in SECRET_ENV_VARS] + list(secrets)
    # longest first, so a secret that contains another one is hidden whole
    for value in sorted({v for v in values if v}, key=len, reverse=True):
        text = text.replace(value, MASK)
        if ":" in value:  # user:password tokens: the password alone must not survive either
            password = value.split(":", 1)[1]
            if len(password) >= 4:
                text = text.replace(password, MASK)
    return text


def uri_secrets(uri: str) -> tuple[str, ...]:
    """The password of ``uri``'s userinfo and every run of it between delimiters (``:/@?#``), at least 3
    characters long: what a URI parser that splits at the wrong place may echo in its own error message
    (``Port could not be cast to integer value as 'pa:SECRET'``). Pass them to :func:`redact`."""
    _, sep, rest = uri.partition("://")
    at = rest.rfind("@")
    if not sep or at < 0:
        return ()
    userinfo = rest[:at]
    password = userinfo.split(":", 1)[1] if ":" in userinfo else userinfo
    pieces = [piece for piece in re.split(r"([:/@?#])", password) if piece]
    runs = {"".join(pieces[i:j]) for i in range(len(pieces)) for j in range(i + 1, len(pieces) + 1)}
    return tuple(sorted((r for r in runs | {userinfo} if len(r) >= 3), key=len, reverse=True))
