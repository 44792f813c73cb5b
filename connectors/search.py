"""Search a deepfeat collection by image, by record id, or by vector; results as plain data or a table.

Every search supports top-k with metadata filters (Milvus boolean expressions such as
``label == "shoe" and split != "train"``, built by :func:`deepfeat.connectors.query.build_filter`),
group-by (one hit per product or patient), range search (a similarity threshold), batched queries and
chosen output fields. A search with images is refused when the bundle is not the one that filled the
collection: vectors of two models are not comparable. Searching by vector or by id is the query layer's
(:mod:`deepfeat.connectors.query`), re-exported here.

Results are ``list[list[dict]]``: one list per query, one dict per hit with ``rank``, ``pk``,
``score`` (the metric's value: cosine or inner-product similarity, higher is closer; or L2 distance,
lower is closer) and the output fields.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepfeat.connectors.client import MilvusConnector
from deepfeat.connectors.collection import open_collection
from deepfeat.connectors.query import (
    DEFAULT_OUTPUT_FIELDS,
    Hit,
    fetch_vectors,
    quote_string,
    search_ids,
    search_vectors,
)
from deepfeat.finetune.errors import DataError

if TYPE_CHECKING:  # the bundle module imports torch; 'deepfeat collections' uses format_table without it
    from deepfeat.finetune.models.bundle import ModelBundle

log = logging.getLogger(__name__)


def _as_bundle(bundle: ModelBundle | str | Path) -> ModelBundle:
    from deepfeat.finetune.models.bundle import ModelBundle  # deferred: torch, only when searching by image

    return bundle if isinstance(bundle, ModelBundle) else ModelBundle.load(bundle)


def search_images(
    conn: MilvusConnector,
    collection: str,
    images: Sequence[Any],
    bundle: ModelBundle | str | Path,
    *,
    embed_batch_size: int = 64,
    progress: bool = False,
    **kwargs: Any,
) -> list[list[Hit]]:
    """Search with images (paths, encoded bytes or HxWxC arrays), embedded by ``bundle``.

    ``kwargs`` are those of :func:`search_vectors`; ``progress`` shows a bar while the images are embedded.

    A collection deepfeat did not create is searched by image only when the bundle that filled it was
    recorded on it (:meth:`~deepfeat.connectors.plugin.DeepfeatImageEmbeddingFunction.record_bundle`):
    otherwise nothing shows that its vectors and the query's come from the same model and preprocessing.

    Raises:
        MismatchError: ``bundle`` is not the bundle that filled the collection, or the collection records
            none (checked before embedding).
    """
    model = _as_bundle(bundle)
    open_collection(conn, collection, bundle=model, what="searching", foreign_ok=True)
    if not len(images):
        return []
    vectors = model.embed(list(images), batch_size=embed_batch_size, progress=progress)
    return search_vectors(conn, collection, vectors, **kwargs)


def _cell(value: Any, width: int) -> str:
    text = f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))
    if isinstance(value, list):
        text = f"[{len(value)} values]"
    return text if len(text) <= width else text[: width - 1] + "…"


def format_hits_table(
    results: Sequence[Sequence[Hit]],
    *,
    queries: Sequence[str] | None = None,
    fields: Sequence[str] | None = None,
    max_width: int = 48,
) -> str:
    """Results as an aligned text table: query, rank, score and the fields (default: all but ``pk``)."""
    if queries is not None and len(queries) != len(results):
        raise DataError(f"{len(queries)} query labels for {len(results)} result lists")
    labels = list(queries) if queries is not None else [f"#{i}" for i in range(len(results))]
    if fields is None:
        seen: list[str] = []
        for hits in results:
            for h in hits:
                seen.extend(k for k in h if k not in ("rank", "score", "pk") and k not in seen)
        fields = seen
    header = ["query", "rank", "score", *fields]
    rows: list[list[str]] = []
    for i, hits in enumerate(results):
        if not hits:
            rows.append([labels[i], "-", "(no hits)", *[""] * len(fields)])
        for h in hits:
            rows.append(
                [
                    labels[i],
                    str(h["rank"]),
                    _cell(float(h["score"]), max_width),
                    *(_cell(h.get(f), max_width) for f in fields),
                ]
            )
    return format_table(header, rows)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, max_width: int = 48) -> str:
    """An aligned text table with a rule under the header."""
    cells = [[str(h) for h in header]] + [
        [_cell(v, max_width) if not isinstance(v, str) else v for v in r] for r in rows
    ]
    widths = [max(len(r[c]) for r in cells) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


__all__ = [
    "DEFAULT_OUTPUT_FIELDS",
    "Hit",
    "fetch_vectors",
    "format_hits_table",
    "format_table",
    "quote_string",
    "search_ids",
    "search_images",
    "search_vectors",
]
