"""Tiny generated data for the recipe tests: a product catalogue, CT/MR-like scans (DICOM and PNG), scenes.

No tests here: the generators and the settings that make every recipe run in seconds.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from support.imagegen import class_image

#: --set overrides that shrink a recipe to seconds: the tiny timm test backbone, 32 px, 2 training steps.
TINY: tuple[str, ...] = (
    "model.backbone=test_efficientnet",
    "model.weights=none",
    "model.image_size=32",
    "model.embedding_dim=32",
    "model.warmup_steps=0",
    "trainer.max_epochs=1",
    "data.batches_per_epoch=2",
    "data.p=3",
    "data.k=3",
    "data.num_workers=0",
    "data.eval_batch_size=64",
    "data.limit_per_class=null",
    "model.max_minutes=null",
)


# --------------------------------------------------------------------------------------------------
# fashion: categories x products x photos, with a price


def product_id(category: int, product: int) -> str:
    """Product ids with a double quote in them: filters must quote them safely."""
    return f'prod "{category}-{product}"'


def make_catalogue(root: Path, *, categories: int = 4, products: int = 4, photos: int = 3) -> Path:
    """``root/catalogue.csv`` (path, label, product_id, price) over PNG photos; returns the manifest.

    A product is one stripe image (its category's angle and colour); its photos are shifted and mirrored
    copies. Prices rise with the product index (10, 20, 30, ... plus the category).
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for c in range(categories):
        for p in range(products):
            base = class_image(c, p, 32, seed=1)
            for v in range(photos):
                image = np.roll(base, shift=int(rng.integers(-2, 3)), axis=1)
                if v == 1:
                    image = image[:, ::-1]
                name = f"c{c}_p{p}_v{v}.png"
                Image.fromarray(np.ascontiguousarray(image)).save(root / name)
                rows.append(
                    {"path": name, "label": f"cat{c}", "product_id": product_id(c, p), "price": float(10 * (p + 1) + c)}
                )
    manifest = root / "catalogue.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


# --------------------------------------------------------------------------------------------------
# medical: CT/MR-like chest phantoms per finding and patient

FINDINGS = ("clear", "nodule", "effusion")
#: (tissue, lung, nodule, fluid, bone) values: CT in Hounsfield units, MR in arbitrary signal units.
_VALUES = {"CT": (40, -850, 180, 15, 700), "MR": (300, 30, 900, 700, 120)}


def phantom(finding: str, patient: int, scan: int, modality: str = "CT", size: int = 64) -> np.ndarray:
    """A chest-like slice: body, two lungs, a spine; a bright nodule or fluid in the lower lungs by finding.

    Patient-specific body size; scan-specific small shifts, nodule position and noise.
    """
    tissue, lung, nodule, fluid, bone = _VALUES[modality]
    rng = np.random.default_rng(1000 * patient + scan)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = size / 2 + rng.uniform(-2, 2), size / 2 + rng.uniform(-2, 2)
    ry, rx = size * (0.36 + 0.02 * (patient % 3)), size * (0.44 + 0.02 * (patient % 2))
    air = -1000.0 if modality == "CT" else 0.0
    image = np.full((size, size), air)
    image[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = tissue
    lungs = np.zeros((size, size), dtype=bool)
    for side in (-1, 1):
        ly, lx = cy - size * 0.03, cx + side * size * 0.2
        lungs |= ((yy - ly) / (size * 0.22)) ** 2 + ((xx - lx) / (size * 0.13)) ** 2 <= 1
    image[lungs] = lung
    image[((yy - (cy + ry * 0.75)) ** 2 + (xx - cx) ** 2) <= (size * 0.06) ** 2] = bone
    if finding == "nodule":
        ny, nx = np.argwhere(lungs)[rng.integers(0, lungs.sum())]
        image[(yy - ny) ** 2 + (xx - nx) ** 2 <= (size * 0.1) ** 2] = nodule
    elif finding == "effusion":
        image[lungs & (yy > cy + size * 0.02)] = fluid
    image += rng.normal(0, 12, image.shape)
    return image


def _window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    return np.clip(np.rint((values - (center - width / 2)) / width * 255), 0, 255).astype(np.uint8)


def write_dicom(
    path: Path,
    frames: list[np.ndarray],
    *,
    patient_id: str,
    modality: str,
    body_part: str = "CHEST",
    monochrome1: bool = False,
) -> Path:
    """A DICOM file of one or more frames, stored as CT (signed, rescale intercept -1024) or MR (unsigned).

    ``monochrome1`` stores the values mirrored about the window centre with ``MONOCHROME1``, so the
    displayed picture (after the inversion a reader must apply) is the same as the ``MONOCHROME2`` one.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    center, width = (40.0, 400.0) if modality == "CT" else (450.0, 1000.0)
    stack = np.stack(frames)
    if monochrome1:
        stack = 2 * center - stack
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality, ds.BodyPartExamined = patient_id, modality, body_part
    ds.Rows, ds.Columns = stack.shape[1:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.WindowCenter, ds.WindowWidth = center, width
    if modality == "CT":
        ds.PixelRepresentation, ds.RescaleIntercept, ds.RescaleSlope = 1, -1024, 1
        stored = np.rint(stack + 1024).astype(np.int16)
    else:
        ds.PixelRepresentation = 0
        stored = np.clip(np.rint(stack), 0, 65535).astype(np.uint16)
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    ds.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def patient_name(finding: int, patient: int) -> str:
    """Patient ids; one has a double quote, which the own-patient filter must escape."""
    return f'PAT"{finding}{patient}' if (finding, patient) == (2, 0) else f"PAT-{finding}{patient}"


def make_scans(root: Path, *, patients: int = 6, scans: int = 2) -> Path:
    """``root/<finding>/<folder>/scan_k.(dcm|png)``: per finding, patients 2-3 MR DICOM, the last one PNG,
    the others CT DICOM.

    DICOM files carry PatientID (which differs from their folder name ``dcm_<patient>``), modality and
    body part; finding 0's first CT patient is stored as ``MONOCHROME1`` and finding 1's as 3-frame files
    (the middle frame is the scan, the others are blank), PNG patients are named only by their folder.
    """
    for f, finding in enumerate(FINDINGS):
        for p in range(patients):
            pid = patient_name(f, p)
            number = 10 * f + p
            modality = "MR" if p in (2, 3) else "CT"
            for s in range(scans):
                values = phantom(finding, number, s, modality)
                if p == patients - 1:
                    folder = root / finding / f"png_{number}"
                    folder.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(_window(values, 40, 400)).save(folder / f"scan_{s}.png")
                    continue
                frames = [values]
                if (f, p) == (1, 0):
                    blank = np.full_like(values, -1000.0)
                    frames = [blank, values, blank]
                write_dicom(
                    root / finding / f"dcm_{number}" / f"scan_{s}.dcm",
                    frames,
                    patient_id=pid,
                    modality=modality,
                    monochrome1=(f, p) == (0, 0),
                )
    return root


# --------------------------------------------------------------------------------------------------
# dedup: distinct random scenes, and planted duplicates


def scene(seed: int, size: int = 128) -> np.ndarray:
    """A random picture: coloured ellipses and rectangles on a coloured ground (distinct per seed)."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = (int(v) for v in rng.integers(0, size - 8, 2))
        w, h = (int(v) for v in rng.integers(8, size // 2, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=colour)
    return np.asarray(image)


def jpeg_bytes(image: np.ndarray, quality: int = 75) -> bytes:
    """``image`` re-encoded as JPEG."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
