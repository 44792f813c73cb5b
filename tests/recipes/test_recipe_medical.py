"""The medical recipe: generated CT/MR scans (DICOM incl. MONOCHROME1 and multi-frame, PNG) and pydicom's own files;
patient-level split, own patient excluded, one case per patient, modality/body part filters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from support.recipes import TINY, make_scans, patient_name, phantom, write_dicom

from deepfeat.connectors import connect, load_embeddings
from deepfeat.connectors.query import collection_frame
from deepfeat.finetune.data.images import load_image
from deepfeat.finetune.inference.embed import iter_embeddings
from deepfeat.finetune.models.bundle import ModelBundle, export_bundle
from deepfeat.finetune.models.model import build_embedding_model
from deepfeat.recipes.cli import main
from deepfeat.recipes.medical import check_cases, dicom_header, patients_by_split, read_scans, similar_cases

PYDICOM_FILES = Path(__import__("pydicom").__file__).parent / "data" / "test_files"


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_scans(tmp_path_factory.mktemp("scans") / "scans")


@pytest.fixture(scope="module")
def medical_run(scans: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("medical") / "out"
    new_scan = write_dicom(
        out.parent / "new" / "scan.dcm", [phantom("nodule", 11, 7)], patient_id=patient_name(1, 1), modality="CT"
    )  # a new scan of a patient already in the collection
    code = main(
        [
            "recipe",
            "run",
            "medical",
            "--data",
            str(scans),
            "--out",
            str(out),
            "--quiet",
            "--query",
            str(new_scan),
            "--set",
            *TINY,
            "data.fractions=[0.34,0.33,0.33]",
            "recipe.search.top_k=4",
        ]
    )
    assert code == 0
    return out, json.loads((out / "recipe.json").read_text())


def test_scans_read_patients_and_metadata(scans: Path) -> None:
    records = read_scans(str(scans)).set_index("id")
    assert len(records) == 36 and records["group"].nunique() == 18
    dcm = records.loc["nodule/dcm_10/scan_0.dcm"]  # the folder is dcm_10, the header says PAT-10
    assert (dcm["group"], dcm["modality"], dcm["body_part"], dcm["n_frames"]) == ("PAT-10", "CT", "CHEST", 3)
    assert records.loc["clear/dcm_2/scan_1.dcm", "modality"] == "MR"
    assert records.loc["effusion/dcm_20/scan_0.dcm", "group"] == 'PAT"20'
    png = records.loc["clear/png_5/scan_0.png"]  # no header: the patient is the folder
    assert (png["group"], png["modality"]) == ("png_5", "")
    assert records.loc["clear/dcm_0/scan_0.dcm", "photometric"] == "MONOCHROME1"


def test_dicom_decoding_window_inversion_and_frames(tmp_path: Path) -> None:
    values = phantom("nodule", 3, 0)
    plain = load_image(write_dicom(tmp_path / "m2.dcm", [values], patient_id="p", modality="CT"))
    inverted = load_image(write_dicom(tmp_path / "m1.dcm", [values], patient_id="p", modality="CT", monochrome1=True))
    assert plain.shape == (64, 64, 3) and plain[..., 0].tolist() == plain[..., 2].tolist()  # gray stays gray
    assert np.abs(plain.astype(int) - inverted.astype(int)).max() <= 1  # MONOCHROME1 shown as MONOCHROME2
    assert plain[0, 0, 0] == 0 and plain.max() == 255  # air below the window, the nodule above it
    blank = np.full_like(values, -1000.0)
    middle = load_image(write_dicom(tmp_path / "mf.dcm", [blank, values, blank], patient_id="p", modality="CT"))
    assert middle.tolist() == plain.tolist()  # a multi-frame file gives its middle frame


def test_medical_run_excludes_own_patient_one_case_per_patient(medical_run: tuple[Path, dict], scans: Path) -> None:
    out, report = medical_run
    modality = read_scans(str(scans)).set_index("id")["modality"]
    assert report["n_loaded"] == report["n_records"] == 36
    summary = report["summary"]
    assert summary["own_patient_hits"] == 0 and summary["repeated_patient_hits"] == 0
    assert summary["patients"] == {"train": 6, "val": 6, "test": 6}
    cases = summary["cases"]
    assert len(cases) == 6 and len({c["patient"] for c in cases}) == 6  # one query scan per test patient
    for case in cases:
        patients = [h["patient"] for h in case["hits"]]
        assert len(patients) == 4 and len(set(patients)) == 4 and case["patient"] not in patients
        query_modality = modality[case["query"]]
        if query_modality:  # a case shares the query's modality and body part (PNG queries name none)
            assert {h["modality"] for h in case["hits"]} == {query_modality}
            assert {h["body_part"] for h in case["hits"]} == {"CHEST"}
    (external,) = summary["external"]  # the new DICOM scan of PAT-11: its own patient is left out too
    assert external["cases"] and patient_name(1, 1) not in {h["patient"] for h in external["cases"]}
    rows = (out / "similar_cases.csv").read_text().splitlines()
    assert rows[0].startswith("query_id,query_patient") and len(rows) == 1 + 6 * 4
    assert (out / "medical_results.png").is_file()


def test_patient_split_is_disjoint_and_filters_hold(medical_run: tuple[Path, dict]) -> None:
    _, report = medical_run
    with connect(report["uri"]) as conn:
        rows, _ = collection_frame(conn, "medical", ("record_id", "group", "split", "modality"))
        assert (rows.groupby("group")["split"].nunique() == 1).all()  # no patient in two splits
        patients_by_split(rows)  # raises when a patient straddles splits
        quoted = rows[rows["group"] == 'PAT"20'].iloc[0]["record_id"]  # the own-patient filter escapes quotes
        ct = rows[rows["modality"] == "CT"]["record_id"].tolist()[:4]
        queries = [quoted, *ct]
        hits = similar_cases(
            conn,
            "medical",
            queries,
            top_k=5,
            filter='modality == "MR"',
            same=(),
            output_fields=["record_id", "group", "modality"],
        )
        assert all(h["modality"] == "MR" for hs in hits for h in hs) and all(hits)
        groups = rows.set_index("record_id")["group"]
        checks = check_cases([{"group": groups[q]} for q in queries], hits)
        assert checks == {"own_patient_hits": 0, "repeated_patient_hits": 0}


def test_pydicom_files_through_the_reader_and_search(tmp_path: Path) -> None:
    """DICOM files that pydicom ships: headers read, pixels decoded, similar cases never the same patient."""
    layout = {
        "ct": ["CT_small.dcm"],
        "mr": [
            "MR_small.dcm",
            "MR_small_RLE.dcm",
            "MR_small_bigendian.dcm",
            "MR_small_implicit.dcm",
            "examples_overlay.dcm",
        ],
        "dose": ["rtdose.dcm"],
    }
    for label, names in layout.items():
        (tmp_path / "data" / label).mkdir(parents=True)
        for name in names:
            if not (PYDICOM_FILES / name).is_file():
                pytest.skip(f"pydicom does not ship {name} in this version")
            shutil.copy(PYDICOM_FILES / name, tmp_path / "data" / label / name)
    records = read_scans(str(tmp_path / "data")).set_index("id")
    assert records.loc["ct/CT_small.dcm", "group"] == "1CT1" and records.loc["ct/CT_small.dcm", "modality"] == "CT"
    assert set(records.loc[[f"mr/{n}" for n in layout["mr"][:4]], "group"]) == {"4MR1"}  # one patient, 4 files
    assert records.loc["mr/examples_overlay.dcm", "body_part"] == "ABDOMEN"
    assert records.loc["dose/rtdose.dcm", "n_frames"] == 15 == dicom_header(PYDICOM_FILES / "rtdose.dcm")["n_frames"]
    for path in records["path"]:
        image = load_image(path)
        assert image.ndim == 3 and image.shape[2] == 3 and image.std() > 0

    model = build_embedding_model("test_efficientnet", "none", head="none", image_size=32)
    bundle = ModelBundle.load(export_bundle(model, tmp_path / "bundle", onnx=False, torchscript=False))
    records = records.reset_index()
    with connect(str(tmp_path / "pydicom.db")) as conn:
        load_embeddings(
            conn,
            "scans",
            ((r.drop(columns=["image"]), v) for r, v in iter_embeddings(bundle, records)),
            bundle=bundle,
            progress=False,
        )
        (hits,) = similar_cases(conn, "scans", ["mr/MR_small.dcm"], top_k=5)
        # the other MR files are the same patient (4MR1): the only MR case from another patient remains
        assert [(h["record_id"], h["group"], h["modality"]) for h in hits] == [
            ("mr/examples_overlay.dcm", "021234567", "MR")
        ]
        (anything,) = similar_cases(conn, "scans", ["mr/MR_small.dcm"], top_k=5, same=())
        assert {h["group"] for h in anything} == {"021234567", "1CT1", "id11111"}
