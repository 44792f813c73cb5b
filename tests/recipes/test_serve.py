"""``deepfeat serve`` over HTTP (FastAPI TestClient) on real Milvus Lite collections filled by real bundles:
search by upload and by id, filters, group-by, compare panels, bad uploads, image serving, the command."""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from support.imagegen import class_image
from support.serve import MEMORY_ID, N_FILES, TRICKY_LABEL, ServeData

from deepfeat.connectors import connect, load_embeddings
from deepfeat.finetune.errors import DataError, MismatchError
from deepfeat.finetune.inference.embed import iter_embeddings
from deepfeat.finetune.models.bundle import ModelBundle
from deepfeat.recipes.cli import main
from deepfeat.recipes.serve import (
    Condition,
    PanelConfig,
    create_app,
    parse_search_request,
    quote_string,
    resolve_image_path,
)

pytest.importorskip("fastapi", reason='deepfeat serve needs the serve extra: pip install "deepfeat[serve]"')
from starlette.testclient import TestClient

BASE = "http://127.0.0.1"


@pytest.fixture(scope="module")
def client(serve_data: ServeData) -> Iterator[TestClient]:
    """One app comparing ``base`` and ``tuned`` (same .db), for the whole module."""
    app = create_app([serve_data.base(), serve_data.tuned()])
    with TestClient(app, base_url=BASE) as c:
        yield c


def upload(client: TestClient, data: bytes, name: str = "query.png", **params: Any) -> Any:
    return client.post(
        "/api/search", files={"image": (name, data, "application/octet-stream")}, data={"params": json.dumps(params)}
    )


def by_id(client: TestClient, record_id: str, **params: Any) -> Any:
    return client.post("/api/search", json={"id": record_id, **params})


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares ``width`` x ``height`` pixels: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------------------------------
# info and examples


def test_info_describes_both_panels_and_the_shared_fields(client: TestClient, serve_data: ServeData) -> None:
    info = client.get("/api/info").json()
    base, tuned = info["panels"]
    assert (base["label"], base["collection"], base["rows"]) == ("off-the-shelf", "base", N_FILES + 1)
    assert (tuned["label"], tuned["collection"], tuned["rows"]) == ("fine-tuned", "tuned", N_FILES)
    assert base["bundle_id"] != tuned["bundle_id"] and base["metric"] == "COSINE" and base["higher_is_closer"]
    fields = {f["name"]: f for f in info["fields"]}
    assert {"label", "split", "group", "weight", "batch", "is_query"} <= set(fields)
    assert not {"content_hash", "model_version", "path"} & set(fields)
    assert fields["weight"]["dtype"] == "DOUBLE" and fields["batch"]["dtype"] == "INT64"
    assert set(fields["label"]["values"]) == {"class_00", "class_01", "class_02", TRICKY_LABEL}
    assert "label" in info["group_by"] and "batch" in info["group_by"] and "weight" not in info["group_by"]
    assert info["max_upload_bytes"] == 20 * 2**20


def test_examples_are_random_records_of_the_first_collection(client: TestClient, serve_data: ServeData) -> None:
    examples = client.get("/api/examples", params={"n": 6, "seed": 3}).json()
    ids = [e["id"] for e in examples]
    assert len(ids) == 6 == len(set(ids)) and set(ids) <= set(serve_data.records["id"])
    assert all(e["image"] == f"/api/image/0/{e['pk']}" for e in examples if e["id"] != MEMORY_ID)
    assert client.get("/api/examples", params={"n": 6, "seed": 3}).json() == examples
    assert client.get("/api/examples", params={"n": 0}).status_code == 422


# --------------------------------------------------------------------------------------------------
# searching


@pytest.mark.parametrize("record_id", ["class_00/img_00.png", "class_02/img_05.png"])
def test_upload_finds_its_own_record_first_in_both_panels(
    client: TestClient, serve_data: ServeData, record_id: str
) -> None:
    data = serve_data.file_of(record_id).read_bytes()
    res = upload(client, data, name="mine.png", top_k=5)
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["query"]["kind"] == "upload" and body["query"]["name"] == "mine.png"
    assert body["query"]["size"] == [48, 48] and body["query"]["image"].startswith("data:image/png;base64,")
    for panel in body["panels"]:
        hits = panel["hits"]
        assert panel["error"] is None and len(hits) == 5
        assert hits[0]["record_id"] == record_id and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        assert hits[0]["image"] == f"/api/image/{panel['index']}/{hits[0]['pk']}"
        assert "content_hash" not in hits[0] and {"label", "split", "group", "weight", "path"} <= set(hits[0])


def test_search_by_id_leaves_the_record_out_unless_asked(client: TestClient) -> None:
    rid = "class_01/img_03.png"
    body = by_id(client, rid, top_k=4).json()
    query = body["query"]
    assert (query["kind"], query["name"], query["label"]) == ("id", rid, "class_01")
    assert query["image"].startswith("/api/image/0/")
    for panel in body["panels"]:
        assert len(panel["hits"]) == 4 and rid not in [h["record_id"] for h in panel["hits"]]
    body = by_id(client, rid, top_k=4, include_self=True).json()
    assert all(p["hits"][0]["record_id"] == rid for p in body["panels"])


def test_a_record_missing_from_one_panel_is_that_panel_s_error(client: TestClient) -> None:
    body = by_id(client, MEMORY_ID, top_k=3).json()
    base, tuned = body["panels"]
    assert base["error"] is None and len(base["hits"]) == 3
    assert body["query"]["image"] is None  # an in-memory record has no file to show
    assert tuned["hits"] == [] and MEMORY_ID in tuned["error"] and "tuned" in tuned["error"]
    res = by_id(client, "no/such.png")
    assert res.status_code == 404 and "'no/such.png' is not in collection 'base'" in res.json()["detail"]


def test_filters_on_text_numbers_and_a_label_that_needs_quoting(client: TestClient) -> None:
    rid = "class_00/img_01.png"
    f: list[dict[str, Any]] = [{"field": "label", "op": "==", "value": "class_02"}]
    body = by_id(client, rid, top_k=10, filters=f).json()
    for panel in body["panels"]:
        assert len(panel["hits"]) == 6 and {h["label"] for h in panel["hits"]} == {"class_02"}
        assert panel["filter"] == 'label == "class_02"'
    f = [{"field": "weight", "op": ">=", "value": 6}, {"field": "batch", "op": "!=", "value": "1"}]
    hits = by_id(client, rid, top_k=50, filters=f).json()["panels"][1]["hits"]
    assert hits and all(h["weight"] >= 6 and h["batch"] != 1 for h in hits)
    assert len(hits) == sum(1 for i in range(12, N_FILES) if i % 3 != 1)
    f = [{"field": "label", "op": "==", "value": TRICKY_LABEL}]
    body = by_id(client, rid, top_k=10, filters=f).json()
    assert body["panels"][0]["filter"] == r'label == "class \"3\" \\ <b>ünï</b>"'
    assert len(body["panels"][0]["hits"]) == 6 and {h["label"] for h in body["panels"][0]["hits"]} == {TRICKY_LABEL}


def test_a_filter_value_cannot_widen_the_expression(client: TestClient) -> None:
    injection = 'class_02" or label != "'
    f = [{"field": "label", "op": "==", "value": injection}]
    body = by_id(client, "class_00/img_01.png", top_k=10, filters=f).json()
    assert all(p["hits"] == [] and p["error"] is None for p in body["panels"])
    f = [{"field": 'label == "x" or split', "op": "==", "value": "train"}]
    res = by_id(client, "class_00/img_01.png", filters=f)
    assert res.status_code == 400 and "cannot filter on" in res.json()["detail"]


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ([{"field": "colour", "op": "==", "value": "red"}], "cannot filter on 'colour'"),
        ([{"field": "label", "op": "<", "value": "b"}], "operator < needs a numeric field"),
        ([{"field": "weight", "op": "==", "value": "heavy"}], "'weight' is a number"),
        ([{"field": "batch", "op": "==", "value": 1.5}], "whole numbers"),
        ([{"field": "is_query", "op": "==", "value": "maybe"}], "true/false"),
        ([{"field": "label", "op": "like", "value": "x"}], "operator 'like'"),
        ([{"field": "label", "op": "==", "value": "a\x00b"}], "control character"),
        ([{"field": "label", "value": "x"}], "exactly field, op and value"),
    ],
)
def test_bad_filters_are_refused_with_the_reason(client: TestClient, filters: Any, message: str) -> None:
    res = by_id(client, "class_00/img_01.png", filters=filters)
    assert res.status_code == 400 and message in res.json()["detail"]


def test_group_by_gives_one_hit_per_value(client: TestClient, serve_data: ServeData) -> None:
    data = serve_data.file_of("class_01/img_00.png").read_bytes()
    body = upload(client, data, top_k=10, group_by="label").json()
    for panel in body["panels"]:
        labels = [h["label"] for h in panel["hits"]]
        assert len(labels) == 4 == len(set(labels))  # four classes: four groups
        assert panel["hits"][0]["record_id"] == "class_01/img_00.png"
    body = by_id(client, "class_01/img_00.png", top_k=3, group_by="batch", group_size=2).json()
    batches = [h["batch"] for h in body["panels"][0]["hits"]]
    assert sorted(batches) == [0, 0, 1, 1, 2, 2]
    for group_by, message in (("weight", "it is DOUBLE"), ("colour", "cannot group by 'colour'")):
        res = by_id(client, "class_01/img_00.png", group_by=group_by)
        assert res.status_code == 400 and message in res.json()["detail"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"top_k": 0}, "top_k must be from 1 to 100"),
        ({"top_k": "many"}, "top_k must be a whole number"),
        ({"group_size": 11}, "group_size must be from 1 to 10"),
        ({"colour": "red"}, "unknown search parameter(s) ['colour']"),
        ({"include_self": "yes"}, "include_self must be true or false"),
        ({"id": 12}, "id must be a non-empty record id"),
    ],
)
def test_bad_search_parameters(client: TestClient, params: dict[str, Any], message: str) -> None:
    res = client.post("/api/search", json={"id": "class_00/img_00.png", **params})
    assert res.status_code == 400 and message in res.json()["detail"]


# --------------------------------------------------------------------------------------------------
# bad uploads


def test_bad_uploads_get_a_clear_400(client: TestClient, serve_data: ServeData) -> None:
    res = upload(client, b"hello, this is text", name="notes.txt")
    assert res.status_code == 400
    assert res.json()["detail"].startswith("cannot read image 'notes.txt': not an image")
    assert "Upload a JPEG, PNG" in res.json()["detail"]
    res = upload(client, b"", name="empty.png")
    assert res.status_code == 400 and "'empty.png'" in res.json()["detail"] and "0 bytes" in res.json()["detail"]
    full = serve_data.file_of("class_00/img_00.png").read_bytes()
    res = upload(client, full[: len(full) // 2], name="cut.png")
    assert res.status_code == 400 and "'cut.png'" in res.json()["detail"]
    for width, height in ((12_000, 9_000), (100_000, 100_000)):  # over deepfeat's limit; over Pillow's own
        res = upload(client, png_header_only(width, height), name="bomb.png")
        assert res.status_code == 400 and "decompression bomb" in res.json()["detail"], res.text
    res = client.post("/api/search", files={"other": ("a.png", full, "image/png")})
    assert res.status_code == 400 and "no file in its 'image' field" in res.json()["detail"]
    res = client.post("/api/search", files={"image": ("a.png", full, "image/png")}, data={"params": "{top_k: 3"})
    assert res.status_code == 400 and "'params' form field is not valid JSON" in res.json()["detail"]
    res = client.post("/api/search", content=b"id=1", headers={"content-type": "text/plain"})
    assert res.status_code == 400 and "multipart/form-data" in res.json()["detail"]
    res = client.post("/api/search", content=b"{nope", headers={"content-type": "application/json"})
    assert res.status_code == 400 and "not valid JSON" in res.json()["detail"]


def test_too_large_uploads_get_413(client: TestClient) -> None:
    res = upload(client, b"\0" * (20 * 2**20 + 1), name="huge.png")  # refused once parsed
    assert res.status_code == 413
    assert res.json()["detail"].startswith("'huge.png' is 20,971,521 bytes; the limit is 20 MB (20,971,520 bytes)")
    res = upload(client, b"\0" * (24 * 2**20), name="huger.png")  # refused from its Content-Length, unparsed
    assert res.status_code == 413 and "larger than the limit of 20 MB" in res.json()["detail"]


def test_upload_limit_is_configurable_and_checked_after_parsing_too(serve_data: ServeData) -> None:
    app = create_app([serve_data.base()], max_upload_bytes=1000)
    with TestClient(app, base_url=BASE) as c:
        data = png_bytes(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
        assert len(data) > 1000
        res = upload(c, data, name="noise.png")  # under the multipart allowance, over the file limit
        assert res.status_code == 413 and "'noise.png' is" in res.json()["detail"]
        res = c.post("/api/search", content=b"x" * 400_000, headers={"content-type": "application/json"})
        assert res.status_code == 413


# --------------------------------------------------------------------------------------------------
# serving images


def test_images_are_served_for_stored_keys_only(client: TestClient, serve_data: ServeData) -> None:
    rid = "class_02/img_01.png"
    hit = by_id(client, rid, top_k=1, include_self=True).json()["panels"][0]["hits"][0]
    res = client.get(hit["image"])
    assert res.status_code == 200 and res.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(res.content)) as im, Image.open(serve_data.file_of(rid)) as original:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(original.convert("RGB")))
    small = client.get(hit["image"], params={"size": 16})
    with Image.open(io.BytesIO(small.content)) as im:
        assert im.size == (16, 16)
    assert client.get("/api/image/0/" + "0" * 32).status_code == 404
    res = client.get("/api/image/0/not-a-key")
    assert res.status_code == 400 and "32 hex digits" in res.json()["detail"]
    assert client.get("/api/image/7/" + hit["pk"]).status_code == 404
    for url in (
        "/api/image/0/..%2F..%2F..%2Fetc%2Fpasswd",
        "/api/image/0/../../etc/passwd",
        "/api/image/0/%2e%2e/%2e%2e/etc/passwd",
        "/static/../app.py",
        "/static/%2e%2e/app.py",
    ):
        res = client.get(url)
        assert res.status_code in (400, 404), url
        assert b"root:" not in res.content and b"def create_app" not in res.content


def test_an_in_memory_record_has_no_image_url_but_a_reason(client: TestClient) -> None:
    f = [{"field": "record_id", "op": "==", "value": MEMORY_ID}]
    hit = by_id(client, "class_00/img_00.png", top_k=1, filters=f).json()["panels"][0]["hits"][0]
    assert hit["record_id"] == MEMORY_ID and hit["image"] is None and hit["path"] == ""
    res = client.get(f"/api/image/0/{hit['pk']}")
    assert res.status_code == 404 and "no image file" in res.json()["detail"]


def test_only_files_inside_the_image_root_are_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"png")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"png")
    (root / "link.png").symlink_to(secret)
    (root / "inner.png").symlink_to(root / "a" / "x.png")
    (root / "loop.png").symlink_to(root / "loop.png")
    inside = (root / "a" / "x.png").resolve()
    assert resolve_image_path("a/x.png", root) == inside
    assert resolve_image_path(str(root / "a" / "x.png"), root) == inside  # stored absolute, inside the root
    assert resolve_image_path("inner.png", root) == inside  # a link that stays inside
    assert resolve_image_path("b/../a/x.png", root) == inside
    escaping = (str(secret), "../secret.png", "a/../../secret.png", "link.png", "/etc/passwd", "loop.png", "a\0b")
    for stored in escaping:
        with pytest.raises(DataError, match="outside the image root") as err:
            resolve_image_path(stored, root)
        assert str(tmp_path) not in str(err.value) and "secret" not in str(err.value) and "passwd" not in str(err.value)
    with pytest.raises(DataError, match=r"'a/gone\.png' is not in the image root") as err:
        resolve_image_path("a/gone.png", root)
    assert str(root) not in str(err.value)
    with pytest.raises(DataError, match="no image file"):
        resolve_image_path("", root)
    monkeypatch.chdir(root)  # no --image-root: the working directory is the root
    assert resolve_image_path(str(root / "a" / "x.png"), None) == inside
    with pytest.raises(DataError, match="outside the image root"):
        resolve_image_path(str(secret), None)


@dataclass(frozen=True)
class EscapeData:
    """A collection whose stored paths try to leave its image root (see :func:`escape_data`)."""

    root: Path
    outside: Path
    panel: PanelConfig


#: The first bytes of a file the page must never echo (an /etc/passwd look-alike inside the root).
SECRET_BYTES = b"root:x:0:0:SECRET-FIRST-BYTES:/root:/bin/sh\n"


@pytest.fixture(scope="module")
def escape_data(serve_data: ServeData, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EscapeData]:
    """Records stored as: a relative path inside the root, an absolute path outside it, a ``..`` path out
    of it, a symlink in the root pointing out of it, and a file inside the root that was an image when it
    was embedded and holds text now."""
    base = tmp_path_factory.mktemp("escape")
    root, outside = base / "root", base / "outside"
    (root / "cat").mkdir(parents=True)
    outside.mkdir()
    files = {
        "in": (root / "cat" / "in.png", "cat/in.png"),
        "fake": (root / "cat" / "fake.png", "cat/fake.png"),
        "absolute": (outside / "absolute.png", str(outside / "absolute.png")),
        "dotdot": (outside / "dotdot.png", "../outside/dotdot.png"),
        "link": (outside / "linked.png", "link.png"),
    }
    for i, (file, _) in enumerate(files.values()):
        Image.fromarray(class_image(i % 4, i, size=48)).save(file)
    (root / "link.png").symlink_to(outside / "linked.png")
    records = pd.DataFrame(
        {
            "id": list(files),
            "path": [stored for _, stored in files.values()],
            "label": ["cat"] * len(files),
            "split": ["train"] * len(files),
            "is_query": [False] * len(files),
            "is_gallery": [False] * len(files),
            "group": list(files),
        }
    )
    db = base / "escape.db"
    bundle = ModelBundle.load(serve_data.base_bundle)
    conn = connect(str(db))
    try:
        rows = iter_embeddings(bundle, records, batch_size=8, root=root, on_error="fail")
        report = load_embeddings(conn, "escape", rows, bundle=bundle, progress=False)
        assert report.final_count == len(files)
    finally:
        conn.release_lite()
    files["fake"][0].write_bytes(SECRET_BYTES)
    yield EscapeData(root, outside, PanelConfig("escape", str(db), "escape", serve_data.base_bundle, root))


def test_images_outside_the_root_are_neither_shown_nor_served(escape_data: EscapeData) -> None:
    with TestClient(create_app([escape_data.panel]), base_url=BASE) as c:
        res = by_id(c, "in", top_k=5, include_self=True)
        assert res.status_code == 200
        hits = {h["record_id"]: h for h in res.json()["panels"][0]["hits"]}
        assert set(hits) == {"in", "fake", "absolute", "dotdot", "link"}
        assert hits["in"]["path"] == "cat/in.png" and hits["in"]["image"] is not None
        assert c.get(hits["in"]["image"]).status_code == 200
        for rid in ("absolute", "dotdot", "link"):
            assert hits[rid]["image"] is None and hits[rid]["path"] == "", rid
            bad = c.get(f"/api/image/0/{hits[rid]['pk']}")
            assert bad.status_code == 404 and "outside the image root" in bad.json()["detail"], rid
            assert str(escape_data.outside) not in bad.text and "outside/" not in bad.text, rid
        assert str(escape_data.outside) not in res.text and "linked" not in res.text
        examples = c.get("/api/examples", params={"n": 5}).text
        assert str(escape_data.outside) not in examples


def test_a_stored_file_that_is_not_an_image_is_refused_without_its_bytes(escape_data: EscapeData) -> None:
    with TestClient(create_app([escape_data.panel]), base_url=BASE) as c:
        hit = by_id(c, "fake", top_k=1, include_self=True).json()["panels"][0]["hits"][0]
        assert hit["record_id"] == "fake" and hit["image"] is not None  # inside the root: offered
        res = c.get(hit["image"])
        assert res.status_code == 404 and "does not decode" in res.json()["detail"]
        assert b"SECRET" not in res.content and b"root:x" not in res.content


# --------------------------------------------------------------------------------------------------
# the page, the host guard, the building blocks


def test_the_page_and_its_assets_are_local(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "http://" not in page.text and "https://" not in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        res = client.get(asset)
        assert res.status_code == 200 and "https://" not in res.text
    script = client.get("/static/app.js").text
    assert not any(sink in script for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"))
    assert client.get("/docs").status_code == 404  # FastAPI's docs page would load scripts from a CDN


def test_only_loopback_host_names_are_answered(serve_data: ServeData) -> None:
    app = create_app([serve_data.base()])
    with TestClient(app, base_url="http://attacker.example") as c:
        assert c.get("/api/info").status_code == 400  # a DNS-rebinding page cannot read the API
    for base in ("http://localhost:8765", "http://[::1]:8765"):
        with TestClient(app, base_url=base) as c:
            assert c.get("/api/info").status_code == 200


def test_a_bundle_that_did_not_fill_the_collection_is_refused_at_start(serve_data: ServeData) -> None:
    with pytest.raises(MismatchError):
        create_app([PanelConfig("wrong", str(serve_data.db), "base", serve_data.tuned_bundle)])


def test_parse_and_quote_building_blocks() -> None:
    req = parse_search_request({"top_k": "7", "filters": [{"field": "label", "op": "!=", "value": "a"}]})
    assert req.top_k == 7 and req.filters == (Condition("label", "!=", "a"),) and req.group_by is None
    assert quote_string('a"b\\c\nü') == '"a\\"b\\\\c\\nü"'
    with pytest.raises(DataError, match="control character"):
        quote_string("\x1b[31m")


# --------------------------------------------------------------------------------------------------
# the command


def _serve_args(data: ServeData, *extra: str) -> list[str]:
    return [
        "serve",
        "--uri",
        str(data.db),
        "--collection",
        "base",
        "--bundle",
        str(data.base_bundle),
        "--image-root",
        str(data.images),
        *extra,
    ]


def test_serve_refuses_a_non_loopback_host(serve_data: ServeData, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_serve_args(serve_data, "--host", "0.0.0.0")) == 2
    err = capsys.readouterr().err
    assert "refusing to serve on '0.0.0.0'" in err and "--allow-remote" in err and "Traceback" not in err


def test_serve_starts_uvicorn_on_loopback(
    serve_data: ServeData, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import uvicorn

    seen: dict[str, Any] = {}

    def fake_run(app: Any, **kwargs: Any) -> None:
        seen.update(kwargs)
        with TestClient(app, base_url=BASE) as c:  # runs the lifespan, which closes the connectors
            seen["info"] = c.get("/api/info").json()

    monkeypatch.setattr(uvicorn, "run", fake_run)
    compare = ["--compare-collection", "tuned", "--compare-bundle", str(serve_data.tuned_bundle)]
    assert main(_serve_args(serve_data, "--port", "18765", *compare)) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 18765
    assert [p["collection"] for p in seen["info"]["panels"]] == ["base", "tuned"]
    assert "deepfeat serve: http://127.0.0.1:18765/" in capsys.readouterr().out


def test_serve_allows_a_remote_host_when_asked(serve_data: ServeData, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    seen: dict[str, Any] = {}

    def fake_run(app: Any, **kwargs: Any) -> None:
        seen.update(kwargs)
        with TestClient(app, base_url="http://search.lan") as c:  # any Host is answered now
            seen["status"] = c.get("/api/info").status_code

    monkeypatch.setattr(uvicorn, "run", fake_run)
    assert main(_serve_args(serve_data, "--host", "0.0.0.0", "--port", "18766", "--allow-remote")) == 0
    assert seen["host"] == "0.0.0.0" and seen["status"] == 200


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--compare-collection", "tuned"], "needs both --compare-collection and --compare-bundle"),
        (["--collection", "nope"], "no collection 'nope'"),
        (["--port", "70000"], "--port must be from 1 to 65535"),
    ],
)
def test_serve_reports_bad_options_in_one_line(
    serve_data: ServeData, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert main(_serve_args(serve_data, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
