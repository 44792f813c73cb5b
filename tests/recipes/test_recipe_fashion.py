"""The fashion recipe end to end: catalogue manifest -> fit -> Milvus Lite -> searches by product, category, price."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.imagegen import class_image
from support.recipes import TINY, make_catalogue, product_id

from deepfeat.connectors import connect
from deepfeat.recipes.cli import main
from deepfeat.recipes.fashion import price_filter, read_catalogue, shop_the_look, similar_items

TOP_K = 3


@pytest.fixture(scope="module")
def fashion_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    base = tmp_path_factory.mktemp("fashion")
    manifest = make_catalogue(base / "catalogue")
    photo = base / "photo.png"  # a new photo of product (1, 2): not in the catalogue
    Image.fromarray(np.ascontiguousarray(np.roll(class_image(1, 2, 32, seed=1), 3, axis=0))).save(photo)
    out = base / "out"
    code = main(
        [
            "recipe",
            "run",
            "fashion",
            "--data",
            str(manifest),
            "--out",
            str(out),
            "--quiet",
            "--query",
            str(photo),
            "--set",
            *TINY,
            "data.fractions=[0.5,0.25,0.25]",
            f"recipe.search.top_k={TOP_K}",
            "recipe.search.n_queries=4",
        ]
    )
    assert code == 0
    return manifest, out, json.loads((out / "recipe.json").read_text())


def test_catalogue_products_become_groups(tmp_path: Path) -> None:
    records = read_catalogue(str(make_catalogue(tmp_path / "c", categories=2, products=2, photos=3)))
    assert records["group"].nunique() == 4 and (records.groupby("group").size() == 3).all()
    assert records["group"].iloc[0] == product_id(0, 0) and records["price"].dtype.kind == "f"


def test_fashion_searches_one_hit_per_product(fashion_run: tuple[Path, Path, dict]) -> None:
    _, out, report = fashion_run
    assert report["n_records"] == report["n_loaded"] == 48  # every photo is in Milvus
    summary = report["summary"]
    assert summary["n_queries"] == 4
    searches = summary["searches"]
    assert len({s["product"] for s in searches}) == 4  # one query photo per product
    for s in searches:
        products = [h["product"] for h in s["similar"]]
        assert len(products) == TOP_K and len(set(products)) == TOP_K  # group-by product
        assert s["product"] not in products  # the query's own product is left out
        scores = [h["score"] for h in s["similar"]]
        assert scores == sorted(scores, reverse=True)
        same = s["same_category"]
        assert same and all(h["label"] == s["label"] for h in same)  # 3 other products per category
        assert len({h["product"] for h in same}) == len(same) and s["product"] not in {h["product"] for h in same}
        band = s["price_band"]
        assert all(band["low"] <= h["price"] <= band["high"] for h in band["hits"])
        assert len({h["product"] for h in band["hits"]}) == len(band["hits"])
    (look,) = summary["shop_the_look"]
    assert len({h["product"] for h in look["hits"]}) == len(look["hits"]) == TOP_K
    assert look["hits"][0]["label"] == "cat1"  # the photo's category comes first
    assert (out / "fashion_results.png").is_file() and (out / "searches.json").is_file()
    with Image.open(out / "fashion_results.png") as im:
        assert im.width > 300 and im.height > 300
        # 4 query rows and the shop-the-look row (1.45 in a row at 110 dpi)
        assert im.height >= round(1.45 * (summary["n_queries"] + 1) * 110)


def test_fashion_filters_on_the_loaded_collection(fashion_run: tuple[Path, Path, dict]) -> None:
    manifest, _, report = fashion_run
    ids = [s["query"] for s in report["summary"]["searches"]]
    with connect(report["uri"]) as conn:
        cheap = similar_items(
            conn,
            "fashion",
            ids,
            top_k=10,
            filter=price_filter(high=25.0),
            output_fields=["record_id", "group", "price"],
        )
        for hits in cheap:
            assert hits and all(h["price"] <= 25.0 for h in hits)
            assert len({h["group"] for h in hits}) == len(hits)
        shirts = similar_items(conn, "fashion", ids, top_k=10, filter='label == "cat2"', exclude_own_product=False)
        assert all(h["label"] == "cat2" for hits in shirts for h in hits)
        every_photo = similar_items(conn, "fashion", ids[:1], top_k=10, group_by=None, exclude_own_product=False)[0]
        assert len({h["group"] for h in every_photo}) < len(every_photo)  # without group-by, photos repeat products
        looks = shop_the_look(conn, "fashion", report["bundle"], [str(manifest.parent / "c3_p1_v0.png")], top_k=2)
        assert looks[0][0]["group"] == product_id(3, 1) and looks[0][0]["score"] == pytest.approx(1.0, abs=1e-4)
