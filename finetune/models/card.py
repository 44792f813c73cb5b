"""The card of a model bundle: ``card.json``, read and checked without torch.

Everything about the card JSON (the :class:`BundleCard` dataclass, its digest, :func:`read_card` with its
checks, and :func:`check_compatible` for two fingerprints) lives here, so that the Milvus connector can list,
describe and check collections without importing torch. :mod:`deepfeat.finetune.models.bundle` adds the
weights (``model.pt``, TorchScript, ONNX) and re-exports these names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepfeat.finetune.errors import MismatchError, ModelError

if TYPE_CHECKING:
    from deepfeat.finetune.models.backbones import Preprocessing

__all__ = ["CARD", "FORMAT_VERSION", "HASHED_FIELDS", "REQUIRED_FIELDS", "BundleCard", "card_digest",
           "check_card", "check_compatible", "read_card"]

FORMAT_VERSION = 2  # 2: card_sha256 covers the fields a query depends on
CARD = "card.json"


@dataclass
class BundleCard:
    """The JSON card of a model bundle."""

    name: str
    bundle_id: str
    embedding_dim: int
    metric: str
    normalized: bool
    preprocessing: dict[str, Any]
    model_config: dict[str, Any]
    weights_sha256: str
    backbone: str
    card_sha256: str = ""
    format_version: int = FORMAT_VERSION
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    created: str = ""

    @property
    def preprocessing_obj(self) -> Preprocessing:
        """The preprocessing as a :class:`~deepfeat.finetune.models.backbones.Preprocessing` (imports torch)."""
        # deferred: backbones imports torch, and reading or comparing a card never needs it
        from deepfeat.finetune.models.backbones import Preprocessing

        return Preprocessing.from_dict(self.preprocessing)

    def fingerprint(self) -> dict[str, Any]:
        """What a collection must agree with: name, id (weights hash), dim, metric, preprocessing."""
        return {"name": self.name, "bundle_id": self.bundle_id, "embedding_dim": self.embedding_dim,
                "metric": self.metric, "preprocessing": self.preprocessing}


#: The card fields that :attr:`BundleCard.card_sha256` covers: everything a collection or a query depends on.
HASHED_FIELDS: tuple[str, ...] = ("name", "bundle_id", "embedding_dim", "metric", "normalized", "preprocessing",
                                  "model_config", "weights_sha256", "backbone", "format_version")
#: Keys a card must have (the rest have defaults).
REQUIRED_FIELDS: tuple[str, ...] = (*HASHED_FIELDS, "card_sha256")


def card_digest(data: dict[str, Any]) -> str:
    """SHA-256 of the :data:`HASHED_FIELDS` of a card (as JSON, sorted keys), stored as ``card_sha256``."""
    covered = {k: data.get(k) for k in HASHED_FIELDS}
    return hashlib.sha256(json.dumps(covered, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_card(path: str | Path, *, verify: bool = True) -> BundleCard:
    """Read and check the card of the bundle at ``path``.

    Args:
        verify: also check that the card agrees with itself (``embedding_dim`` and ``preprocessing``
            with the ``model_config`` they were exported with, ``metric`` with ``normalized``) and that
            ``card_sha256`` still matches the fields it covers (:data:`HASHED_FIELDS`).

    Raises:
        ModelError: no card, not JSON, another format version, missing keys, or a card edited after
            export; each names the field and says to re-export the bundle.
    """
    root = Path(path)
    card_path = root / CARD
    if not card_path.is_file():
        raise ModelError(f"{str(root)!r} is not a deepfeat model bundle (no {CARD}); create one with "
                         f"'deepfeat export' or deepfeat.finetune.export_bundle()")
    try:
        data = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"the card {str(card_path)!r} is not valid JSON ({exc}); re-export the bundle") from exc
    except OSError as exc:
        raise ModelError(f"cannot read the card {str(card_path)!r} ({exc.strerror or exc}); check its "
                         f"permissions or re-export the bundle") from exc
    if not isinstance(data, dict):
        raise ModelError(f"the card {str(card_path)!r} holds a JSON {type(data).__name__}, not an object; "
                         f"re-export the bundle")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelError(f"bundle {str(root)!r} has format_version {version!r}; this deepfeat reads "
                         f"{FORMAT_VERSION}. Re-export it with this version")
    missing = [k for k in REQUIRED_FIELDS if k not in data]
    if missing:
        raise ModelError(f"the card {str(card_path)!r} lacks the key(s) {missing}; it is incomplete or was "
                         f"edited by hand: re-export the bundle ('deepfeat export')")
    known = set(BundleCard.__dataclass_fields__)
    card = BundleCard(**{k: v for k, v in data.items() if k in known})
    if verify:
        check_card(card, data, card_path)
    return card


def _edited(card_path: Path, what: str) -> ModelError:
    return ModelError(f"the card {str(card_path)!r} was edited after export: {what}. Re-export the bundle "
                      f"('deepfeat export') instead of editing {CARD}")


def check_card(card: BundleCard, data: dict[str, Any], card_path: Path) -> None:
    """Check that ``card`` agrees with its own model_config, and its hash with its fields (see :func:`read_card`).

    Args:
        card: the card built from ``data``.
        data: the card's JSON object as read from disk (what :func:`card_digest` hashes).
        card_path: the ``card.json`` path, named in the error.

    Raises:
        ModelError: naming the edited field and saying to re-export the bundle.
    """
    config = card.model_config if isinstance(card.model_config, dict) else {}
    backbone = config.get("backbone") if isinstance(config.get("backbone"), dict) else {}
    if card.embedding_dim != config.get("embedding_dim"):
        raise _edited(card_path, f"embedding_dim is {card.embedding_dim!r} but the model it was exported from "
                                 f"gives {config.get('embedding_dim')!r}")
    if backbone and card.preprocessing != backbone.get("preprocessing"):
        changed = sorted(k for k in set(card.preprocessing) | set(backbone.get("preprocessing") or {})
                         if card.preprocessing.get(k) != (backbone.get("preprocessing") or {}).get(k))
        raise _edited(card_path, f"preprocessing {changed} differs from the preprocessing the model was "
                                 f"exported with")
    if card.metric != ("COSINE" if card.normalized else "L2") or card.normalized != config.get("normalize", True):
        raise _edited(card_path, f"metric {card.metric!r} / normalized {card.normalized!r} disagree with the "
                                 f"model (normalize={config.get('normalize', True)!r})")
    if card_digest(data) != card.card_sha256:
        raise _edited(card_path, f"card_sha256 {str(card.card_sha256)[:12]!r} does not match the fields it covers "
                                 f"({', '.join(HASHED_FIELDS)})")


def check_compatible(expected: dict[str, Any], actual: dict[str, Any], *, what: str) -> None:
    """Refuse two fingerprints that disagree (dim, metric, preprocessing, bundle id).

    Raises:
        MismatchError: naming each field that differs, both values, and the fix.
    """
    diffs = [f"{k}: {expected.get(k)!r} != {actual.get(k)!r}"
             for k in ("embedding_dim", "metric", "preprocessing", "bundle_id") if expected.get(k) != actual.get(k)]
    if diffs:
        raise MismatchError(f"{what}: the model bundle does not match ({'; '.join(diffs)}). Use the bundle "
                            f"that filled it ({expected.get('bundle_id')!r}), or re-index into a new collection")
