"""Vector index parameters: what each Milvus index type takes, checked before a collection exists.

An :class:`IndexSpec` names the index type, its build parameters and its default search parameters;
:data:`BUILD_PARAM_RULES` and :data:`SEARCH_PARAM_RULES` hold the values Milvus accepts for each type (the
ranges of the Milvus index documentation), so a wrong name or value is refused with the nearest valid one
instead of failing inside the server (or, on Milvus Lite, being silently dropped).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from deepfeat.finetune.errors import ConnectorError

IndexType = Literal["FLAT", "IVF_FLAT", "IVF_SQ8", "HNSW", "HNSW_SQ", "AUTOINDEX"]

#: Build parameters of each index type when none are given.
BUILD_DEFAULTS: dict[str, dict[str, Any]] = {
    "FLAT": {},
    "IVF_FLAT": {"nlist": 128},
    "IVF_SQ8": {"nlist": 128},
    "HNSW": {"M": 16, "efConstruction": 200},
    "HNSW_SQ": {"M": 16, "efConstruction": 200, "sq_type": "SQ8"},
    "AUTOINDEX": {},
}
#: Search parameters of each index type when none are given.
SEARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "FLAT": {},
    "IVF_FLAT": {"nprobe": 16},
    "IVF_SQ8": {"nprobe": 16},
    "HNSW": {"ef": 64},
    "HNSW_SQ": {"ef": 64},
    "AUTOINDEX": {},
}


_INT_MAX = 2**31 - 1


@dataclass(frozen=True)
class ParamRule:
    """What one index parameter accepts: an integer or number in ``[low, high]``, a boolean, or one
    of ``choices`` (the ranges of the Milvus index documentation, checked before a collection exists)."""

    kind: Literal["int", "float", "bool", "choice"]
    low: float = -math.inf
    high: float = math.inf
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        """The accepted values, for messages."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        what = "an integer" if self.kind == "int" else "a number"
        def show(x: float) -> str:
            return str(int(x)) if self.kind == "int" else f"{x:g}"

        low = "" if math.isinf(self.low) else f" of at least {show(self.low)}"
        high = "" if math.isinf(self.high) else f" and at most {show(self.high)}"
        return f"{what}{low}{high}"

    def coerce(self, value: Any) -> int | float | bool | str | None:
        """``value`` in its canonical type, or ``None`` when the rule refuses it."""
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            return {"true": True, "1": True, "false": False, "0": False}.get(text)
        if self.kind == "choice":
            text = str(value).strip().upper()
            return text if text in self.choices else None
        if isinstance(value, bool):
            return None
        number = _number(value.strip()) if isinstance(value, str) else value
        if not isinstance(number, int | float) or not math.isfinite(number):
            return None
        if self.kind == "int":
            if float(number) != int(number):
                return None
            number = int(number)
        return number if self.low <= number <= self.high else None


_NLIST = ParamRule("int", 1, 65536)
_GRAPH = {"M": ParamRule("int", 2, 2048), "efConstruction": ParamRule("int", 1, _INT_MAX)}
_SQ_TYPES = ("SQ6", "SQ8", "BF16", "FP16")
_RANGE = {"radius": ParamRule("float"), "range_filter": ParamRule("float")}

#: Build parameters each index type takes, with the values Milvus accepts (milvus.io/docs, index pages).
BUILD_PARAM_RULES: dict[str, dict[str, ParamRule]] = {
    "FLAT": {},
    "IVF_FLAT": {"nlist": _NLIST},
    "IVF_SQ8": {"nlist": _NLIST},
    "HNSW": dict(_GRAPH),
    "HNSW_SQ": {**_GRAPH, "sq_type": ParamRule("choice", choices=_SQ_TYPES), "refine": ParamRule("bool"),
                "refine_type": ParamRule("choice", choices=(*_SQ_TYPES, "FP32"))},
    "AUTOINDEX": {},
}
#: Search parameters each index type takes (``nprobe`` at most ``nlist`` is checked by :class:`IndexSpec`).
SEARCH_PARAM_RULES: dict[str, dict[str, ParamRule]] = {
    "FLAT": dict(_RANGE),
    "IVF_FLAT": {"nprobe": _NLIST, **_RANGE},
    "IVF_SQ8": {"nprobe": _NLIST, **_RANGE},
    "HNSW": {"ef": ParamRule("int", 1, _INT_MAX), **_RANGE},
    "HNSW_SQ": {"ef": ParamRule("int", 1, _INT_MAX), "refine_k": ParamRule("float", 1), **_RANGE},
    "AUTOINDEX": {"level": ParamRule("int", 1, 10), **_RANGE},
}


def check_index_params(
    kind: str, params: Mapping[str, Any], rules: Mapping[str, ParamRule], what: Literal["build", "search"]
) -> dict[str, Any]:
    """``params`` with each value in its canonical type, after checking names and values against ``rules``.

    Raises:
        ConnectorError: a name the index type does not take (with the nearest valid name), or a value
            out of range or of the wrong type (with what is accepted).
    """
    out: dict[str, Any] = {}
    for name, value in params.items():
        rule = rules.get(str(name))
        if rule is None:
            raise ConnectorError(
                f"index {kind} has no {what} parameter {name!r}{_nearest(str(name), list(rules))}; it takes "
                f"{', '.join(sorted(rules)) or 'none'}"
            )
        coerced = rule.coerce(value)
        if coerced is None:
            example = f" (e.g. '{kind}:{name}={_example(kind, name)}')" if what == "build" else ""
            raise ConnectorError(
                f"index {kind} {what} parameter {name}={value!r} is invalid: it must be {rule.describe()}; "
                f"fix the value{example}"
            )
        out[str(name)] = coerced
    return out


def _nearest(name: str, valid: Sequence[str]) -> str:
    folded = {v.lower(): v for v in valid}
    match = folded.get(name.lower()) or next(iter(difflib.get_close_matches(name, valid, n=1, cutoff=0.5)), None)
    return f" (did you mean {match!r}?)" if match else ""


def _example(kind: str, name: str) -> Any:
    default = {**BUILD_DEFAULTS[kind], **SEARCH_DEFAULTS[kind]}.get(name)
    return default if default is not None else "..."


@dataclass(frozen=True)
class IndexSpec:
    """The vector index: type, build parameters and default search parameters.

    Args:
        index_type: ``FLAT`` (exact), ``IVF_FLAT``, ``IVF_SQ8``, ``HNSW``, ``HNSW_SQ`` or ``AUTOINDEX``
            (the server chooses; the only type on Zilliz Cloud serverless).
        params: build parameters overriding the defaults (``nlist`` for IVF, ``M``/``efConstruction``
            for HNSW, plus ``sq_type``/``refine``/``refine_type`` for HNSW_SQ).
        search_params: search parameters overriding the defaults (``nprobe``, ``ef``).

    Raises:
        ConnectorError: an unknown index type, a parameter the type does not take (naming the nearest
            valid one), or a value outside the range Milvus accepts (see :data:`BUILD_PARAM_RULES`),
            all before any collection is created.
    """

    index_type: IndexType = "AUTOINDEX"
    params: Mapping[str, Any] = field(default_factory=dict)
    search_params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        kind = str(self.index_type).upper()
        if kind not in BUILD_DEFAULTS:
            raise ConnectorError(f"unknown index type {self.index_type!r}; choose one of {sorted(BUILD_DEFAULTS)}")
        object.__setattr__(self, "index_type", kind)
        object.__setattr__(self, "params", check_index_params(kind, self.params, BUILD_PARAM_RULES[kind], "build"))
        object.__setattr__(
            self, "search_params", check_index_params(kind, self.search_params, SEARCH_PARAM_RULES[kind], "search")
        )
        nlist, nprobe = self.build_params().get("nlist"), self.search_params.get("nprobe")
        if nlist is not None and nprobe is not None and nprobe > nlist:
            raise ConnectorError(
                f"index {kind} search parameter nprobe={nprobe} is more than nlist={nlist}; Milvus probes at most "
                f"nlist clusters: lower nprobe or raise nlist"
            )

    def build_params(self) -> dict[str, Any]:
        """Defaults of the type updated with ``params``."""
        return {**BUILD_DEFAULTS[self.index_type], **dict(self.params)}

    def search_defaults(self, top_k: int) -> dict[str, Any]:
        """Search parameters for ``top_k`` results (HNSW's ``ef`` is at least ``top_k``)."""
        out = {**SEARCH_DEFAULTS[self.index_type], **dict(self.search_params)}
        if self.index_type in ("HNSW", "HNSW_SQ"):
            out["ef"] = max(int(out.get("ef", 64)), top_k)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored in the collection's properties)."""
        return {
            "index_type": self.index_type,
            "params": dict(self.params),
            "search_params": dict(self.search_params),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IndexSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(
            cast(IndexType, data.get("index_type", "AUTOINDEX")),
            dict(data.get("params") or {}),
            dict(data.get("search_params") or {}),
        )

    @classmethod
    def parse(cls, text: str) -> IndexSpec:
        """From the CLI form ``TYPE`` or ``TYPE:key=value,key=value`` (``HNSW:M=32,efConstruction=256``)."""
        kind, _, rest = text.partition(":")
        params: dict[str, Any] = {}
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ConnectorError(
                    f"index option {item!r} in {text!r} is not key=value; write e.g. 'HNSW:M=32,efConstruction=256'"
                )
            params[key.strip()] = _number(value.strip())
        return cls(cast(IndexType, kind.strip().upper()), params)


def _number(text: str) -> int | float | str:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            continue
    return text
