"""Collection specs, keys, tokens and the plugin: fast checks (Milvus Lite only where a test needs it)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image
from support.connectors import DIM, make_images

from deepfeat.connectors import (
    CollectionSpec,
    DeepfeatImageEmbeddingFunction,
    IndexSpec,
    connect,
    create_collection,
    primary_key,
    resolve_token,
)
from deepfeat.connectors.client import MilvusConnector, redact_uri
from deepfeat.connectors.schema import check_vectors, user_fields
from deepfeat.finetune.errors import ConnectorError, DataError, MismatchError
from deepfeat.finetune.models.bundle import ModelBundle


def test_primary_key_is_a_stable_hex_digest() -> None:
    key = primary_key('shoes/it\'s "red".png')
    assert key == primary_key('shoes/it\'s "red".png') and len(key) == 32
    assert all(c in "0123456789abcdef" for c in key)
    assert primary_key("a") != primary_key("b")


def test_spec_from_bundle_and_metadata(bundle_dir: Path) -> None:
    records = pd.DataFrame(
        {
            "id": ["a", "b"],
            "path": ["a.png", "b.png"],
            "label": ["x", "y"],
            "split": "train",
            "is_query": [True, False],
            "is_gallery": [True, True],
            "group": ["a", "b"],
            "price": [1.5, None],
            "stock": [3, 4],
            "colour": ["red", None],
            "image": [b"", b""],
            "embedding_extra": [[1, 2], [3]],
        }
    )
    spec = CollectionSpec.from_bundle("shop", bundle_dir, metadata=records, index="HNSW:M=32")
    by_name = {f.name: f for f in spec.fields}
    assert spec.dim == DIM and spec.metric == "COSINE" and spec.index.build_params() == {"M": 32, "efConstruction": 200}
    assert by_name["price"].dtype == "DOUBLE" and by_name["price"].nullable
    assert by_name["stock"].dtype == "INT64" and by_name["colour"].dtype == "VARCHAR"
    assert by_name["is_query"].dtype == "BOOL" and not by_name["is_query"].nullable
    assert "image" not in by_name and "embedding_extra" not in by_name and "id" not in by_name
    props = spec.properties()
    assert json.loads(props["deepfeat.bundle"])["bundle_id"].startswith("tiny@")
    again = CollectionSpec.from_description({"collection_name": "shop", "properties": props})
    assert again.fields == spec.fields and again.index == spec.index and again.fingerprint == spec.fingerprint


def test_arrow_schema_fields_and_bad_names() -> None:
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("vector", pa.list_(pa.float32())),
            ("weight", pa.float32()),
            ("count", pa.int16()),
            ("flag", pa.bool_()),
            ("when", pa.timestamp("s")),
        ]
    )
    assert [(f.name, f.dtype) for f in user_fields(schema)] == [
        ("weight", "DOUBLE"),
        ("count", "INT64"),
        ("flag", "BOOL"),
        ("when", "VARCHAR"),
    ]
    with pytest.raises(DataError, match=r"\['bad name'\] are not valid Milvus field names"):
        user_fields(pd.DataFrame({"id": ["a"], "bad name": [1]}))
    assert [f.name for f in user_fields(pd.DataFrame({"id": ["a"], "bad name": [1]}), exclude=["bad name"])] == []


def test_encode_refuses_nan_wrong_dim_and_long_strings(bundle_dir: Path) -> None:
    spec = CollectionSpec.from_bundle("shop", bundle_dir)
    frame = pd.DataFrame({"id": ["a", "b"], "label": ["x", None]})
    rows = spec.encode(frame, np.ones((2, DIM), dtype=np.float64))
    assert rows[1]["label"] == "" and rows[0]["pk"] == primary_key("a") and rows[0]["vector"].dtype == np.float32
    with pytest.raises(MismatchError, match="dim 8"):
        spec.encode(frame, np.ones((2, 8)))
    inf = np.ones((2, DIM))
    inf[0, 3] = -np.inf
    with pytest.raises(DataError, match=r"record ids \['a'\]"):
        check_vectors(inf, DIM, ["a", "b"], where="test")
    with pytest.raises(DataError, match="field 'label' is 2000 bytes"):
        spec.encode(pd.DataFrame({"id": ["a"], "label": ["é" * 1000]}), np.ones((1, DIM)))
    with pytest.raises(DataError, match="no 'id' column"):
        spec.encode(pd.DataFrame({"label": ["a"]}), np.ones((1, DIM)))


def test_properties_round_trip_in_milvus_lite(conn: MilvusConnector, bundle_dir: Path) -> None:
    spec = create_collection(conn, CollectionSpec.from_bundle("shop", bundle_dir))
    described = conn.describe("shop")
    assert CollectionSpec.from_description(described).fingerprint == spec.fingerprint
    with pytest.raises(ConnectorError, match="keyed by record_id, not content_hash"):
        create_collection(conn, CollectionSpec.from_bundle("shop", bundle_dir, key="content_hash"))
    with pytest.raises(ConnectorError, match="already exists"):
        create_collection(conn, spec, exist_ok=False)
    conn.client.create_collection("plain", dimension=4)
    with pytest.raises(ConnectorError, match="not created by deepfeat"):
        CollectionSpec.from_description(conn.describe("plain"))


def test_token_from_env_and_file_never_shown(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("DEEPFEAT_MILVUS_TOKEN", "MILVUS_TOKEN", "DEEPFEAT_MILVUS_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert resolve_token() is None
    monkeypatch.setenv("MILVUS_TOKEN", "root:Milvus")
    assert resolve_token() == "root:Milvus"
    monkeypatch.setenv("DEEPFEAT_MILVUS_TOKEN", "s3cr3t-token")
    assert resolve_token() == "s3cr3t-token"
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    assert resolve_token(token_file=secret) == "from-file"
    (tmp_path / "empty").write_text("")
    with pytest.raises(ConnectorError, match="is empty"):
        resolve_token(token_file=tmp_path / "empty")
    caplog.set_level(logging.DEBUG)
    c = connect("https://user:pw@milvus.example.com:19530?x=1")
    assert c.token == "s3cr3t-token"
    assert "s3cr3t" not in repr(c) and "pw" not in repr(c) and "token=***" in repr(c)
    assert redact_uri("https://user:pw@h:19530/db?token=abc") == "https://***@h:19530/db"
    assert "s3cr3t" not in caplog.text
    assert connect(str(tmp_path / "x.db"), token="ignored").token is None
    with pytest.raises(ConnectorError, match="not https"):
        from deepfeat.connectors import TLSOptions

        connect("http://h:19530", tls=TLSOptions(ca_pem_path="ca.pem"))


def test_unreachable_server_fails_after_bounded_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEEPFEAT_MILVUS_TOKEN", raising=False)
    c = connect("http://127.0.0.1:9", retries=2, backoff=0.01, timeout=1)
    with pytest.raises(ConnectorError, match=r"unreachable after 2 attempts"):
        c.client  # noqa: B018


def test_index_spec_parsing() -> None:
    assert IndexSpec.parse("hnsw:M=8, efConstruction=64") == IndexSpec("HNSW", {"M": 8, "efConstruction": 64})
    assert IndexSpec.parse("IVF_SQ8").build_params() == {"nlist": 128}
    assert IndexSpec("HNSW").search_defaults(top_k=500)["ef"] == 500
    with pytest.raises(ConnectorError, match="not key=value"):
        IndexSpec.parse("HNSW:M")


def test_plugin_has_the_pymilvus_model_shape(
    bundle: ModelBundle, bundle_dir: Path, tmp_path: Path, conn: MilvusConnector
) -> None:
    ef = DeepfeatImageEmbeddingFunction(bundle_dir)
    root = make_images(tmp_path / "images", n_per_class=2)
    paths = sorted(root.rglob("*.png"))
    docs = ef.encode_documents(paths)
    assert ef.dim == DIM and ef.metric == "COSINE" and ef.model_name == "tiny" and len(docs) == 6
    assert all(isinstance(d, np.ndarray) and d.shape == (DIM,) for d in docs)
    np.testing.assert_allclose(np.stack(docs), bundle.embed(paths), atol=1e-6)
    pil = Image.open(paths[0])
    np.testing.assert_allclose(ef.encode_queries([pil])[0], docs[0], atol=1e-5)
    np.testing.assert_allclose(ef([np.asarray(pil.convert("RGB"))])[0], docs[0], atol=1e-5)
    assert ef.encode_queries([]) == [] and "tiny" in repr(ef)

    client = conn.client  # plugged into plain pymilvus, as a text model would be
    client.create_collection("plain", dimension=ef.dim, metric_type=ef.metric)
    client.insert("plain", [{"id": i, "vector": v} for i, v in enumerate(docs)])
    hits = client.search("plain", data=ef.encode_queries([paths[3]]), limit=1)
    assert hits[0][0]["id"] == 3


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("HNSW:M=0", r"M=0 is invalid: it must be an integer of at least 2 and at most 2048"),
        ("HNSW:M=-3", r"M=-3 is invalid"),
        ("HNSW:M=16.5", r"M=16.5 is invalid"),
        ("HNSW:efConstruction=abc", r"efConstruction='abc' is invalid: it must be an integer"),
        ("IVF_FLAT:nlist=0", r"nlist=0 is invalid: it must be an integer of at least 1 and at most 65536"),
        ("IVF_SQ8:nlist=70000", r"nlist=70000 is invalid"),
        ("HNSW_SQ:sq_type=SQ5", r"sq_type='SQ5' is invalid: it must be one of SQ6, SQ8, BF16, FP16"),
        ("HNSW_SQ:refine=maybe", r"refine='maybe' is invalid: it must be true or false"),
        ("HNSW:m=16", r"no build parameter 'm' \(did you mean 'M'\?\)"),
        ("HNSW:efConstructon=64", r"no build parameter 'efConstructon' \(did you mean 'efConstruction'\?\)"),
        ("IVF_FLAT:nlists=64", r"did you mean 'nlist'"),
        ("FLAT:nlist=64", r"FLAT has no build parameter 'nlist'; it takes none"),
        ("HNSWX", r"unknown index type"),
    ],
)
def test_invalid_index_parameters_are_refused_before_anything_is_created(text: str, match: str) -> None:
    with pytest.raises(ConnectorError, match=match) as info:
        IndexSpec.parse(text)
    assert "\n" not in str(info.value)


def test_index_parameters_in_their_canonical_types_and_search_params_checked() -> None:
    spec = IndexSpec.parse("HNSW_SQ:M=8.0,efConstruction=64,sq_type=sq6,refine=true,refine_type=fp32")
    assert spec.build_params() == {"M": 8, "efConstruction": 64, "sq_type": "SQ6", "refine": True,
                                   "refine_type": "FP32"}
    assert IndexSpec("HNSW_SQ").search_defaults(top_k=100)["ef"] == 100
    assert IndexSpec("IVF_FLAT", {"nlist": 8}, {"nprobe": 8}).search_defaults(5) == {"nprobe": 8}
    with pytest.raises(ConnectorError, match="nprobe=16 is more than nlist=8"):
        IndexSpec("IVF_FLAT", {"nlist": 8}, {"nprobe": 16})
    with pytest.raises(ConnectorError, match=r"search parameter ef=0 is invalid"):
        IndexSpec("HNSW", search_params={"ef": 0})
    with pytest.raises(ConnectorError, match=r"no search parameter 'nprobe'"):
        IndexSpec("HNSW", search_params={"nprobe": 4})
    # a spec stored in a collection's properties goes through the same checks
    with pytest.raises(ConnectorError, match="M=1 is invalid"):
        IndexSpec.from_dict({"index_type": "HNSW", "params": {"M": 1}})


def test_hnsw_sq_collection_is_created_and_searchable(conn: MilvusConnector, bundle_dir: Path) -> None:
    spec = create_collection(conn, CollectionSpec.from_bundle("sq", bundle_dir, index="HNSW_SQ:M=8,sq_type=SQ8"))
    assert spec.index.index_type == "HNSW_SQ"
    conn.client.insert("sq", spec.encode(pd.DataFrame({"id": ["a", "b"]}), np.eye(2, DIM)))
    hits = conn.client.search("sq", data=[np.eye(1, DIM)[0].tolist()], limit=1, anns_field="vector",
                              search_params={"params": spec.index.search_defaults(1)})
    assert hits[0][0]["pk"] == primary_key("a")


@pytest.mark.parametrize(
    "password", ["pa@SECRETPART", "p:a/ss@w@rd", "s3cr3t/x?y#z", "plain"]
)
def test_the_whole_userinfo_is_masked_whatever_the_password(password: str) -> None:
    from deepfeat.finetune.redaction import mask_uri, redact

    uri = f"http://root:{password}@127.0.0.1:1"
    assert mask_uri(uri) == "http://***@127.0.0.1:1" == redact_uri(uri)
    text = redact(f"Milvus at {uri} is unreachable; also 'https://u:{password}@h:443/db?token=abc&x=1'")
    assert password not in text and "SECRET" not in text and "abc" not in text
    assert text.startswith("Milvus at http://***@127.0.0.1:1 is unreachable")
    assert mask_uri("/tmp/x.db") == "/tmp/x.db"


def test_unreachable_server_message_and_logs_hold_no_password(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("DEEPFEAT_MILVUS_TOKEN", raising=False)
    monkeypatch.delenv("MILVUS_TOKEN", raising=False)
    caplog.set_level(logging.DEBUG)
    c = connect("http://root:pa@SECRETPART@127.0.0.1:1", token="root:t0ken/with@at", retries=2, backoff=0.01,
                timeout=1)
    with pytest.raises(ConnectorError) as info:
        c.client  # noqa: B018
    assert "http://***@127.0.0.1:1" in str(info.value)
    for shown in (str(info.value), caplog.text, repr(c), c.display_uri):
        assert "SECRETPART" not in shown and "pa@" not in shown and "t0ken" not in shown
