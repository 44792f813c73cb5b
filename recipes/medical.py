"""Medical recipe: similar cases from scans, split and searched at the patient level.

Scans are DICOM (read with pydicom: rescale, window/level, ``MONOCHROME1`` inverted, the middle frame of a
multi-frame file; see :func:`deepfeat.finetune.data.images.load_image`) or PNG/JPEG, in a folder with one
sub-folder per finding (``root/<label>/[<patient>/]<scan>``) or in a CSV/Parquet manifest
(``path, label, patient_id, modality, body_part``).

:func:`read_scans` fills ``patient_id``, ``modality`` and ``body_part`` from the DICOM header where the
manifest does not give them (PNG/JPEG take the patient from a ``<label>/<patient>/`` folder), and makes
the patient the record ``group``: the split keeps every patient in one split (no patient in both train
and test), and :func:`similar_cases` leaves the query's own patient out and returns one case per patient,
optionally restricted to the query's modality and body part.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from deepfeat.connectors.client import MilvusConnector
from deepfeat.connectors.query import build_filter, search_each
from deepfeat.connectors.search import search_images
from deepfeat.finetune.data.contract import validate_records
from deepfeat.finetune.data.images import is_dicom
from deepfeat.finetune.data.readers import read_records
from deepfeat.finetune.errors import DataError
from deepfeat.finetune.models.bundle import ModelBundle
from deepfeat.recipes.config import RecipeConfig
from deepfeat.recipes.engine import RecipeContext
from deepfeat.recipes.recipes import pick_queries, record_image
from deepfeat.recipes.viz import result_grid

log = logging.getLogger(__name__)

Hits = list[list[dict[str, Any]]]

#: Record column <- DICOM attribute, filled from the header where the data does not give a value.
DICOM_COLUMNS: dict[str, str] = {"patient_id": "PatientID", "modality": "Modality", "body_part": "BodyPartExamined"}
#: Fields a similar case shares with its query by default.
SAME_FIELDS: tuple[str, ...] = ("modality", "body_part")


def dicom_header(path: str | Path) -> dict[str, Any]:
    """``patient_id``, ``modality``, ``body_part``, ``n_frames`` and ``photometric`` of a DICOM file (no pixels read).

    Raises:
        DataError: the file is not readable DICOM.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
    except Exception as exc:  # pydicom raises many types for corrupt files
        raise DataError(f"cannot read the DICOM header of {str(path)!r} ({type(exc).__name__}: {exc})") from exc
    out: dict[str, Any] = {col: str(ds.get(attr, "") or "").strip() for col, attr in DICOM_COLUMNS.items()}
    out["n_frames"] = int(ds.get("NumberOfFrames", 1) or 1)
    out["photometric"] = str(ds.get("PhotometricInterpretation", "") or "").strip()
    return out


def _is_dicom_file(path: Any) -> bool:
    if not isinstance(path, str) or not path:
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return is_dicom(head, path)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == ""


def read_scans(source: str, *, patient_column: str = "patient_id") -> pd.DataFrame:
    """Scan records with the patient as ``group`` and ``modality``/``body_part`` metadata.

    The patient comes from ``patient_column`` (a manifest), else the DICOM ``PatientID``, else the
    ``<label>/<patient>/`` folder of the file; a scan with none of these is its own patient (logged,
    since the patient-level split cannot then be guaranteed for it).

    Raises:
        DataError: the source cannot be read, a DICOM header is corrupt, or one patient's scans were
            given different splits in a manifest.
    """
    records = read_records(source)
    headers = {i: dicom_header(p) for i, p in zip(records.index, records["path"], strict=True) if _is_dicom_file(p)}
    columns: dict[str, list[Any]] = {
        c: list(records[c]) if c in records.columns else [None] * len(records)
        for c in (patient_column, "modality", "body_part")
    }
    n_frames: list[int] = []
    photometric: list[str] = []
    own = 0
    for pos, (index, rid) in enumerate(zip(records.index, records["id"], strict=True)):
        header = headers.get(index, {})
        for column, key in ((patient_column, "patient_id"), ("modality", "modality"), ("body_part", "body_part")):
            if _missing(columns[column][pos]):
                columns[column][pos] = header.get(key, "")
        if _missing(columns[patient_column][pos]):
            parts = str(rid).split("/")
            if len(parts) >= 3:  # <label>/<patient>/<scan>
                columns[patient_column][pos] = parts[-2]
            else:
                columns[patient_column][pos] = str(rid)
                own += 1
        n_frames.append(int(header.get("n_frames", 1)))
        photometric.append(str(header.get("photometric", "")))
    if own:
        log.warning(
            "%d scan(s) name no patient (no %s column, no DICOM PatientID, no <label>/<patient>/ folder): "
            "each is treated as its own patient",
            own,
            patient_column,
        )
    out = records.assign(
        **{c: [str(v) for v in values] for c, values in columns.items()}, n_frames=n_frames, photometric=photometric
    )
    out["group"] = out[patient_column]
    out = validate_records(out, check_files=False)
    log.info("%d scans of %d patients (%d DICOM)", len(out), out["group"].nunique(), len(headers))
    return out


def read(source: str, config: RecipeConfig) -> pd.DataFrame:
    """The recipe's reader (``recipe.group_column`` names the patient column of a manifest)."""
    return read_scans(source, patient_column=str(config.recipe.get("group_column", "patient_id")))


def patients_by_split(records: pd.DataFrame) -> dict[str, set[str]]:
    """The patients (``group``) of each split.

    Raises:
        DataError: a patient has scans in more than one split.
    """
    splits = {str(s): set(map(str, g["group"])) for s, g in records.groupby("split")}
    names = sorted(splits)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = splits[a] & splits[b]
            if shared:
                raise DataError(
                    f"{len(shared)} patient(s) have scans in both {a!r} and {b!r}, e.g. {sorted(shared)[:3]}; "
                    f"split by patient (data.split_mode: by_group)"
                )
    return splits


def similar_cases(
    conn: MilvusConnector,
    collection: str,
    record_ids: Sequence[str],
    *,
    top_k: int = 5,
    filter: str | None = None,
    same: Sequence[str] = SAME_FIELDS,
    output_fields: Sequence[str] | None = None,
) -> Hits:
    """Cases like stored scans: one scan per patient, never the query's own patient.

    Args:
        filter: a Milvus expression, e.g. ``'modality == "CT"'`` or ``'split != "test"'``.
        same: fields a case must share with its query (default: modality and body part).
        output_fields: fields in each hit (default: record_id, label, group, split, path and ``same``).
    """
    fields = output_fields if output_fields is not None else ["record_id", "label", "group", "split", "path", *same]
    return search_each(
        conn,
        collection,
        record_ids,
        top_k=top_k,
        filter=filter,
        same=same,
        exclude_own_group=True,
        group_by="group",
        output_fields=fields,
    )


def similar_cases_for_scans(
    conn: MilvusConnector,
    collection: str,
    bundle: ModelBundle | str | Path,
    scans: Sequence[str],
    *,
    top_k: int = 5,
    filter: str | None = None,
    same: Sequence[str] = SAME_FIELDS,
) -> Hits:
    """Cases like new scan files; a DICOM query's own patient (``PatientID``) is left out, and ``same``
    fields are matched where its header gives them."""
    out: Hits = []
    for scan in scans:
        header = dicom_header(scan) if _is_dicom_file(scan) else {}
        equals = {f: header[f] for f in same if header.get(f)}
        not_equals = {"group": header["patient_id"]} if header.get("patient_id") else {}
        expr = build_filter(filter, equals=equals, not_equals=not_equals)
        out.extend(
            search_images(
                conn,
                collection,
                [scan],
                bundle,
                top_k=top_k,
                filter=expr,
                group_by="group",
                output_fields=["record_id", "label", "group", "split", "path", *same],
            )
        )
    return out


def check_cases(queries: Sequence[Mapping[str, Any]], hits: Hits) -> dict[str, int]:
    """Counts that must be zero: hits of the query's own patient, patients repeated within one result."""
    own = sum(1 for q, hs in zip(queries, hits, strict=True) for h in hs if h.get("group") == q["group"])
    repeated = sum(len(hs) - len({h.get("group") for h in hs}) for hs in hits)
    return {"own_patient_hits": own, "repeated_patient_hits": repeated}


def _write_cases_csv(path: Path, picks: pd.DataFrame, hits: Hits, same: Sequence[str]) -> None:
    """Write the similar cases of every picked query to ``path`` as CSV, one row per hit."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "query_id",
                "query_patient",
                "query_label",
                "rank",
                "case_id",
                "case_patient",
                "case_label",
                "score",
                *same,
            ]
        )
        for (_, q), hs in zip(picks.iterrows(), hits, strict=True):
            for h in hs:
                writer.writerow(
                    [
                        q["id"],
                        q["group"],
                        q["label"],
                        h["rank"],
                        h.get("record_id"),
                        h.get("group"),
                        h.get("label"),
                        f"{h['score']:.6f}",
                        *(h.get(f) for f in same),
                    ]
                )


def _external_cases(ctx: RecipeContext, *, top_k: int, same: tuple[str, ...]) -> list[dict[str, Any]]:
    """Similar cases for the scans from outside the collection (``ctx.queries``), one entry per scan."""
    search = ctx.config.search
    external: list[dict[str, Any]] = []
    if ctx.queries:
        for scan, hs in zip(
            ctx.queries,
            similar_cases_for_scans(
                ctx.conn, ctx.collection, ctx.bundle, ctx.queries, top_k=top_k, filter=search.get("filter"), same=same
            ),
            strict=True,
        ):
            external.append(
                {
                    "scan": scan,
                    "cases": [
                        {
                            "id": h.get("record_id"),
                            "patient": h.get("group"),
                            "label": h.get("label"),
                            "score": h["score"],
                        }
                        for h in hs
                    ],
                }
            )
    return external


def _picture_rows(ctx: RecipeContext, picks: pd.DataFrame, hits: Hits) -> list[dict[str, Any]]:
    """Rows of the result picture: each query scan with the images of its cases (undecodable ones left out)."""
    by_id = ctx.record_by_id()
    rows = []
    for (_, q), hs in zip(picks.iterrows(), hits, strict=True):
        image = record_image(q)
        if image is not None:
            rows.append(
                {
                    "image": image,
                    "label": q["label"],
                    "hits": [
                        {"image": im, "label": h.get("label"), "score": h["score"]}
                        for h in hs
                        if (im := record_image(by_id.loc[str(h["record_id"])])) is not None
                    ],
                }
            )
    return rows


def _case_summary(
    ids: list[str], picks: pd.DataFrame, hits: Hits, same: Sequence[str]
) -> list[dict[str, Any]]:
    """The ``cases`` entry of the summary: each query with its hits (scores rounded)."""
    return [
        {
            "query": i,
            "patient": str(q["group"]),
            "label": str(q["label"]),
            "hits": [
                {
                    "id": h.get("record_id"),
                    "patient": h.get("group"),
                    "label": h.get("label"),
                    "score": round(float(h["score"]), 4),
                    **{f: h.get(f) for f in same},
                }
                for h in hs
            ],
        }
        for i, (_, q), hs in zip(ids, picks.iterrows(), hits, strict=True)
    ]


def act(ctx: RecipeContext) -> dict[str, Any]:
    """Similar cases for test patients (one query scan each), checked, written as CSV and a picture."""
    search, opts = ctx.config.search, ctx.config.action
    top_k = int(search.get("top_k", 5))
    same = tuple(opts.get("same_fields", SAME_FIELDS) or ())
    splits = patients_by_split(ctx.records)
    test = ctx.records[(ctx.records["split"] == "test") & ctx.records["is_query"]]
    if test.empty:
        raise DataError(
            "the medical recipe found no test scans; give more patients or a larger test fraction (data.fractions)"
        )
    picks = pick_queries(
        ctx.records, int(search.get("n_queries", 8)), seed=int(ctx.config.section("data").get("seed", 0))
    )
    ids = picks["id"].astype(str).tolist()
    hits = similar_cases(ctx.conn, ctx.collection, ids, top_k=top_k, filter=search.get("filter"), same=same)
    checks = check_cases(picks.to_dict("records"), hits)
    path = ctx.out / "similar_cases.csv"
    _write_cases_csv(path, picks, hits, same)
    external = _external_cases(ctx, top_k=top_k, same=same)
    rows = _picture_rows(ctx, picks, hits)
    picture = (
        result_grid(rows, ctx.out / "medical_results.png", title="similar cases: one per patient, own patient excluded")
        if rows
        else None
    )
    precision = [
        np.mean([h.get("label") == q["label"] for h in hs])
        for (_, q), hs in zip(picks.iterrows(), hits, strict=True)
        if hs
    ]
    return {
        "n_queries": len(ids),
        "top_k": top_k,
        "same_fields": list(same),
        "patients": {s: len(p) for s, p in splits.items()},
        **checks,
        "label_precision": float(np.mean(precision)) if precision else None,
        "cases": _case_summary(ids, picks, hits, same),
        "external": external,
        "files": {"cases": str(path), "picture": str(picture) if picture else None},
    }
