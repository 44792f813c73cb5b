"""Fashion recipe: similar items from a catalogue, filtered by category or any metadata, one hit per product.

The catalogue is a folder (one sub-folder per category) or a CSV/Parquet manifest whose rows are photos:
``path``, ``label`` (the category), a product id column (several photos per product; it becomes the
record ``group``, so a product never straddles train and test and search can return one hit per
product) and any metadata (``price``, ``brand``, ...), which become Milvus scalar fields to filter on.

* :func:`similar_items`: more like a catalogue item, one hit per product, its own product left out;
* :func:`shop_the_look`: products in a query photo that is not in the catalogue;
* :func:`price_filter` / :func:`~deepfeat.connectors.query.build_filter`: filters with safely quoted values.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from deepfeat.connectors.client import MilvusConnector
from deepfeat.connectors.query import build_filter, search_each
from deepfeat.connectors.search import search_images
from deepfeat.finetune.data.contract import validate_records
from deepfeat.finetune.data.readers import read_records
from deepfeat.finetune.errors import DataError
from deepfeat.finetune.models.bundle import ModelBundle
from deepfeat.recipes.config import RecipeConfig
from deepfeat.recipes.engine import RecipeContext
from deepfeat.recipes.recipes import pick_queries, record_image
from deepfeat.recipes.viz import result_grid

log = logging.getLogger(__name__)

Hits = list[list[dict[str, Any]]]


def read_catalogue(source: str, *, group_column: str | None = "product_id") -> pd.DataFrame:
    """Catalogue records: a category folder or a manifest; ``group_column`` (when present) becomes ``group``.

    Raises:
        DataError: the source cannot be read, or a product's photos were given different splits.
    """
    records = read_records(source)
    if group_column and group_column in records.columns:
        records = records.assign(group=records[group_column].astype(str))
        records = validate_records(records, check_files=False)
        log.info(
            "%d photos of %d products in %d categories",
            len(records),
            records["group"].nunique(),
            records["label"].nunique(),
        )
    elif group_column:
        log.info("no %r column: every photo is its own product", group_column)
    return records


def read(source: str, config: RecipeConfig) -> pd.DataFrame:
    """The recipe's reader (``recipe.group_column`` names the product id column)."""
    return read_catalogue(source, group_column=config.recipe.get("group_column", "product_id"))


def price_filter(low: float | None = None, high: float | None = None, *, column: str = "price") -> str | None:
    """``column`` between ``low`` and ``high`` (inclusive; ``None`` leaves a side open)."""
    return build_filter(ranges={column: (low, high)})


def similar_items(
    conn: MilvusConnector,
    collection: str,
    record_ids: Sequence[str],
    *,
    top_k: int = 5,
    filter: str | None = None,
    same_category: bool = False,
    exclude_own_product: bool = True,
    group_by: str | None = "group",
    output_fields: Sequence[str] | None = None,
) -> Hits:
    """Items like catalogue records: one hit per product (``group_by``), the query's own product left out.

    Args:
        filter: a Milvus expression on metadata, e.g. ``price_filter(20, 80)`` or ``'brand == "acme"'``.
        same_category: only items of the query's own category (``label``).
        output_fields: fields in each hit (default: record_id, label, group, split, path).
    """
    return search_each(
        conn,
        collection,
        record_ids,
        top_k=top_k,
        filter=filter,
        same=("label",) if same_category else (),
        exclude_own_group=exclude_own_product,
        group_by=group_by,
        output_fields=output_fields,
    )


def shop_the_look(
    conn: MilvusConnector,
    collection: str,
    bundle: ModelBundle | str | Path,
    images: Sequence[Any],
    *,
    top_k: int = 5,
    filter: str | None = None,
    group_by: str | None = "group",
) -> Hits:
    """Catalogue products that look like each query photo (a path, encoded bytes or an array), one per product."""
    return search_images(conn, collection, list(images), bundle, top_k=top_k, filter=filter, group_by=group_by)


def _brief(hits: list[dict[str, Any]], extra: Sequence[str] = ()) -> list[dict[str, Any]]:
    return [
        {
            "id": h.get("record_id"),
            "product": h.get("group"),
            "label": h.get("label"),
            "score": round(float(h["score"]), 4),
            **{k: h.get(k) for k in extra},
        }
        for h in hits
    ]


def _searches(
    ctx: RecipeContext,
    picks: pd.DataFrame,
    *,
    top_k: int,
    group_by: str | None,
    base_filter: str | None,
    price_column: str,
    band: float,
    has_price: bool,
) -> list[dict[str, Any]]:
    """Per query: similar items (plain, same category) and, where it has a price, within the price band."""
    ids = picks["id"].astype(str).tolist()
    extra = [price_column] if has_price else []
    plain = similar_items(ctx.conn, ctx.collection, ids, top_k=top_k, filter=base_filter, group_by=group_by)
    category = similar_items(
        ctx.conn, ctx.collection, ids, top_k=top_k, filter=base_filter, same_category=True, group_by=group_by
    )
    searches: list[dict[str, Any]] = []
    for i, (_, q) in enumerate(picks.iterrows()):
        entry: dict[str, Any] = {
            "query": str(q["id"]),
            "product": str(q["group"]),
            "label": str(q["label"]),
            "similar": _brief(plain[i]),
            "same_category": _brief(category[i]),
        }
        if has_price and not pd.isna(q[price_column]):
            price = float(q[price_column])
            low, high = price * (1 - band), price * (1 + band)
            hits = similar_items(
                ctx.conn,
                ctx.collection,
                [str(q["id"])],
                top_k=top_k,
                filter=build_filter(base_filter, price_filter(low, high, column=price_column)),
                group_by=group_by,
                output_fields=["record_id", "label", "group", price_column],
            )[0]
            entry["price_band"] = {"low": low, "high": high, "hits": _brief(hits, extra)}
        searches.append(entry)
    return searches


def _looks(ctx: RecipeContext, *, top_k: int, base_filter: str | None, group_by: str | None) -> list[dict[str, Any]]:
    """Shop the look for the photos from outside the catalogue (``ctx.queries``), one entry per photo."""
    looks: list[dict[str, Any]] = []
    if ctx.queries:
        for photo, hits in zip(
            ctx.queries,
            shop_the_look(
                ctx.conn, ctx.collection, ctx.bundle, ctx.queries, top_k=top_k, filter=base_filter, group_by=group_by
            ),
            strict=True,
        ):
            looks.append({"photo": photo, "hits": _brief(hits)})
    return looks


def _picture_rows(
    ctx: RecipeContext, searches: list[dict[str, Any]], looks: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Rows of the result picture: each query with its similar items, then each shop-the-look photo."""
    by_id = ctx.record_by_id()
    rows = []
    for entry in searches:
        q_image = record_image(by_id.loc[entry["query"]])
        if q_image is None:
            continue
        drawn = [
            {"image": im, "label": h["label"], "score": h["score"]}
            for h in entry["similar"]
            if (im := record_image(by_id.loc[h["id"]])) is not None
        ]
        rows.append({"image": q_image, "label": entry["label"], "hits": drawn})
    for look in looks:  # shop the look: the photo from outside the catalogue, then the products it finds
        photo = record_image({"id": look["photo"], "path": look["photo"]})
        if photo is None:
            continue
        drawn = [
            {"image": im, "label": h["label"], "score": h["score"]}
            for h in look["hits"]
            if h["id"] in by_id.index and (im := record_image(by_id.loc[h["id"]])) is not None
        ]
        rows.append({"image": photo, "label": None, "title": f"shop the look\n{Path(look['photo']).name}",
                     "hits": drawn})
    return rows


def act(ctx: RecipeContext) -> dict[str, Any]:
    """Example searches on the catalogue: similar items (plain, same category, price band), shop the look."""
    opts, search = ctx.config.action, ctx.config.search
    top_k = int(search.get("top_k", 5))
    group_by = search.get("group_by", "group")
    base_filter = search.get("filter")
    price_column = str(opts.get("price_column", "price"))
    band = float(opts.get("price_band", 0.5))
    has_price = price_column in ctx.records.columns and pd.api.types.is_numeric_dtype(ctx.records[price_column])
    picks = pick_queries(
        ctx.records, int(search.get("n_queries", 4)), seed=int(ctx.config.section("data").get("seed", 0))
    )
    if picks.empty:
        raise DataError("the fashion recipe found no query records in the catalogue")
    searches = _searches(
        ctx,
        picks,
        top_k=top_k,
        group_by=group_by,
        base_filter=base_filter,
        price_column=price_column,
        band=band,
        has_price=has_price,
    )
    looks = _looks(ctx, top_k=top_k, base_filter=base_filter, group_by=group_by)
    rows = _picture_rows(ctx, searches, looks)
    picture = (
        result_grid(rows, ctx.out / "fashion_results.png", title=f"similar items, one per product (top {top_k})")
        if rows
        else None
    )
    (ctx.out / "searches.json").write_text(json.dumps({"searches": searches, "shop_the_look": looks}, indent=2))
    precision = [np.mean([h["label"] == e["label"] for h in e["similar"]]) for e in searches if e["similar"]]
    summary = {
        "n_queries": len(searches),
        "top_k": top_k,
        "category_precision": float(np.mean(precision)) if precision else None,
        "searches": searches,
        "shop_the_look": looks,
        "files": {"searches": str(ctx.out / "searches.json"), "picture": str(picture) if picture else None},
    }
    return summary
