"""Incremental sync and alias-switched re-indexing against a real Milvus Lite with a real tiny bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support.connectors import all_rows, make_images, write_image

from deepfeat.connectors import open_collection, reindex, search_images, sync_records
from deepfeat.connectors.client import MilvusConnector
from deepfeat.connectors.sync import reindex_name
from deepfeat.finetune.errors import ConnectorError, MismatchError
from deepfeat.finetune.models.bundle import ModelBundle


def test_sync_adds_updates_and_deletes_only_what_changed(
    conn: MilvusConnector, bundle: ModelBundle, tmp_path: Path
) -> None:
    root = make_images(tmp_path / "images", n_per_class=3)
    first = sync_records(conn, "shop", root, bundle, progress=False)
    assert (first.added, first.updated, first.deleted, first.unchanged, first.final_count) == (9, 0, 0, 0, 9)
    before = all_rows(conn, "shop")

    rng = np.random.default_rng(42)
    write_image(root / "red" / "01.png", (250, 250, 0), rng)  # changed content
    (root / "green" / "02.png").unlink()  # gone
    write_image(root / "blue" / "03.png", (10, 10, 10), rng)  # new
    (root / "gray").mkdir()
    write_image(root / "gray" / "00.png", (128, 128, 128), rng)  # new class
    second = sync_records(conn, "shop", root, bundle, progress=False)
    assert (second.added, second.updated, second.deleted, second.unchanged) == (2, 1, 1, 7)
    assert second.final_count == 10 == conn.count("shop")
    after = all_rows(conn, "shop")
    assert "green/02.png" not in after and {"blue/03.png", "gray/00.png"} <= set(after)
    changed = after["red/01.png"]
    assert changed["content_hash"] != before["red/01.png"]["content_hash"]
    np.testing.assert_allclose(changed["vector"], bundle.embed([root / "red" / "01.png"])[0], atol=1e-5)
    np.testing.assert_array_equal(after["red/00.png"]["vector"], before["red/00.png"]["vector"])  # untouched

    third = sync_records(conn, "shop", root, bundle, progress=False)
    assert (third.added, third.updated, third.deleted, third.unchanged) == (0, 0, 0, 10)


def test_dry_run_reports_without_writing(conn: MilvusConnector, bundle: ModelBundle, tmp_path: Path) -> None:
    root = make_images(tmp_path / "images", n_per_class=2)
    sync_records(conn, "shop", root, bundle, progress=False)
    (root / "red" / "00.png").unlink()
    report = sync_records(conn, "shop", root, bundle, progress=False, dry_run=True)
    assert report.dry_run and report.deleted == 1 and conn.count("shop") == 6


def test_unreadable_image_is_reported_and_its_row_kept(
    conn: MilvusConnector, bundle: ModelBundle, tmp_path: Path
) -> None:
    root = make_images(tmp_path / "images", n_per_class=2)
    sync_records(conn, "shop", root, bundle, progress=False)
    (root / "blue" / "01.png").write_bytes(b"this is not a png")
    report = sync_records(conn, "shop", root, bundle, progress=False)
    assert report.skipped == 1 and report.skipped_ids == ["blue/01.png"]
    assert report.deleted == 0 and conn.count("shop") == 6


def test_sync_with_another_bundle_is_refused(
    conn: MilvusConnector, bundle: ModelBundle, other_bundle_dir: Path, tmp_path: Path
) -> None:
    root = make_images(tmp_path / "images", n_per_class=1)
    sync_records(conn, "shop", root, bundle, progress=False)
    with pytest.raises(MismatchError, match=r"bundle_id: 'tiny@.*' != 'tiny_v2@"):
        sync_records(conn, "shop", root, other_bundle_dir, progress=False)


def test_reindex_fills_a_new_collection_then_switches_the_alias(
    conn: MilvusConnector, bundle: ModelBundle, other_bundle_dir: Path, tmp_path: Path
) -> None:
    root = make_images(tmp_path / "images", n_per_class=2)
    v1 = reindex(conn, "shop", root, bundle, progress=False)
    assert v1.collection == reindex_name("shop", bundle.card.bundle_id) and v1.previous_collection is None
    assert conn.resolve_alias("shop") == v1.collection and v1.final_count == 6
    query = [root / "red" / "00.png"]
    assert search_images(conn, "shop", query, bundle, top_k=1)[0][0]["record_id"] == "red/00.png"

    new_model = ModelBundle.load(other_bundle_dir)
    v2 = reindex(conn, "shop", root, new_model, progress=False)
    assert v2.previous_collection == v1.collection and conn.resolve_alias("shop") == v2.collection
    assert open_collection(conn, "shop").fingerprint["bundle_id"] == new_model.card.bundle_id
    assert search_images(conn, "shop", query, new_model, top_k=1)[0][0]["record_id"] == "red/00.png"
    with pytest.raises(MismatchError):  # the old model's queries no longer fit the alias
        search_images(conn, "shop", query, bundle, top_k=1)
    assert conn.has_collection(v1.collection)  # kept for rollback

    v3 = reindex(conn, "shop", root, bundle, progress=False, drop_previous=True)  # roll back, drop v2
    assert v3.collection == v1.collection and v3.added == 0 and v3.unchanged == 6
    assert conn.resolve_alias("shop") == v1.collection and not conn.has_collection(v2.collection)


def test_reindex_behind_a_collection_name_is_refused(
    conn: MilvusConnector, bundle: ModelBundle, tmp_path: Path
) -> None:
    root = make_images(tmp_path / "images", n_per_class=1)
    sync_records(conn, "shop", root, bundle, progress=False)
    with pytest.raises(ConnectorError, match="'shop' is a collection, not an alias"):
        reindex(conn, "shop", root, bundle, progress=False)


def test_sync_keyed_by_content_collapses_copies(conn: MilvusConnector, bundle: ModelBundle, tmp_path: Path) -> None:
    import shutil

    root = make_images(tmp_path / "images", n_per_class=2)
    shutil.copy(root / "red" / "00.png", root / "blue" / "copy_of_red.png")
    report = sync_records(conn, "dedup", root, bundle, key="content_hash", progress=False)
    assert report.added == 6 and report.final_count == 6
    (root / "red" / "00.png").unlink()  # the copy still holds that content: its row stays
    again = sync_records(conn, "dedup", root, bundle, progress=False)
    assert (again.added, again.deleted, again.unchanged, again.final_count) == (0, 0, 6, 6)


def test_sync_through_an_alias_updates_its_collection(
    conn: MilvusConnector, bundle: ModelBundle, tmp_path: Path
) -> None:
    root = make_images(tmp_path / "images", n_per_class=1)
    first = reindex(conn, "live", root, bundle, progress=False)
    write_image(root / "red" / "99.png", (200, 0, 0), np.random.default_rng(1))
    report = sync_records(conn, "live", root, bundle, progress=False)
    assert report.collection == first.collection and report.added == 1 and conn.count(first.collection) == 4
