"""Model bundles: a directory that carries everything a query needs.

``card.json`` (backbone, embedding dim, metric, exact preprocessing, training summary, metrics),
``model.pt`` (state dict, loaded with ``weights_only=True``), and where the backbone allows,
``model.ts`` (TorchScript) and ``model.onnx``. This module does not import Lightning, so the Milvus
connector can load bundles without the training stack.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepfeat.finetune.data.images import load_image
from deepfeat.finetune.errors import MismatchError, ModelError
from deepfeat.finetune.models.backbones import Preprocessing
from deepfeat.finetune.models.model import EmbeddingModel
from deepfeat.finetune.redaction import MASK, redact

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: card_sha256 covers the fields a query depends on
CARD = "card.json"
WEIGHTS = "model.pt"
TORCHSCRIPT = "model.ts"
ONNX = "model.onnx"


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
        """The preprocessing as a :class:`Preprocessing`."""
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


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _state_sha256(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _sanitize(obj: Any) -> Any:
    """Drop anything that looks like a credential before it reaches a card on disk.

    Values under keys naming a token, password or secret; and in every string, what
    :func:`deepfeat.finetune.redaction.redact` hides (URI userinfo up to the last ``@``, ``token=``
    query values, the token environment variables' values).
    """
    if isinstance(obj, dict):
        return {k: (MASK if any(s in str(k).lower() for s in ("token", "password", "secret")) else _sanitize(v))
                for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_sanitize(v) for v in obj]
    if isinstance(obj, str):
        return redact(obj)
    return obj


def export_bundle(model: EmbeddingModel, path: str | Path, *, name: str | None = None,
                  training: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                  extra: dict[str, Any] | None = None, torchscript: bool = True, onnx: bool = True,
                  overwrite: bool = False) -> Path:
    """Write ``model`` as a bundle directory and return its path.

    The directory is assembled in a temporary sibling and renamed into place, so a reader never sees
    a half-written bundle. TorchScript and ONNX are best-effort (a failure is logged and the card's
    ``files`` says what is there); the weights and card always are.
    """
    dest = Path(path)
    if dest.exists() and not overwrite:
        raise ModelError(f"bundle directory {str(dest)!r} already exists; choose another path or pass "
                         f"overwrite=True (--overwrite)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp.chmod(0o755)
    model = model.eval().cpu()
    try:
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        torch.save(state, tmp / WEIGHTS)
        digest = _state_sha256(state)
        files = [WEIGHTS]
        h, w = model.preprocessing.input_size
        example = torch.rand(2, 3, h, w)
        if torchscript:
            try:
                with warnings.catch_warnings():  # torch 2.14 deprecates jit; the file is still the portable one
                    warnings.simplefilter("ignore", FutureWarning)
                    traced = torch.jit.trace(model, example, check_trace=False)
                    traced.save(str(tmp / TORCHSCRIPT))
                files.append(TORCHSCRIPT)
            except Exception as exc:  # some backbones do not trace; weights still suffice
                log.warning("TorchScript export skipped: %s", exc)
        if onnx:
            try:
                _export_onnx(model, example, tmp / ONNX)
                files.append(ONNX)
            except Exception as exc:
                log.warning("ONNX export skipped: %s", exc)
        name = name or dest.name
        card = BundleCard(
            name=name, bundle_id=f"{name}@{digest[:12]}", embedding_dim=model.embedding_dim,
            metric="COSINE" if model.normalize else "L2", normalized=model.normalize,
            preprocessing=model.preprocessing.to_dict(), model_config=model.config(), weights_sha256=digest,
            backbone=model.backbone.name, training=_sanitize(training or {}), metrics=_sanitize(metrics or {}),
            extra=_sanitize(extra or {}), files=files,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        data = json.loads(json.dumps(asdict(card)))  # the JSON form, which is what a reader hashes
        data["card_sha256"] = card.card_sha256 = card_digest(data)
        (tmp / CARD).write_text(json.dumps(data, indent=2, sort_keys=True))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported bundle %s to %s (%s)", card.bundle_id, dest, ", ".join(files))
    return dest


def _export_onnx(model: EmbeddingModel, example: torch.Tensor, out: Path) -> None:
    kwargs: dict[str, Any] = {"input_names": ["images"], "output_names": ["embeddings"],
                              "dynamic_axes": {"images": {0: "batch"}, "embeddings": {0: "batch"}},
                              "opset_version": 17}
    try:
        torch.onnx.export(model, (example,), str(out), dynamo=False, **kwargs)
    except TypeError:  # older torch without the dynamo flag
        torch.onnx.export(model, (example,), str(out), **kwargs)


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
        _check_card(card, data, card_path)
    return card


def _edited(card_path: Path, what: str) -> ModelError:
    return ModelError(f"the card {str(card_path)!r} was edited after export: {what}. Re-export the bundle "
                      f"('deepfeat export') instead of editing {CARD}")


def _check_card(card: BundleCard, data: dict[str, Any], card_path: Path) -> None:
    """The card agrees with its own model_config, and its hash with its fields (see :func:`read_card`)."""
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


def _build_model(root: Path, card: BundleCard, state: dict[str, torch.Tensor]) -> EmbeddingModel:
    """The model of ``card.model_config`` with ``state`` loaded; a config the weights do not fit is refused."""
    try:
        model = EmbeddingModel.from_config(card.model_config)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"bundle {str(root)!r}: model_config in {CARD} cannot be rebuilt ({type(exc).__name__}: "
                         f"{exc}); re-export the bundle") from exc
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatch: the config was edited (e.g. embedding_dim)
        first = " ".join(str(exc).split())[:300]
        raise ModelError(f"bundle {str(root)!r}: the weights do not fit model_config in {CARD} ({first}); "
                         f"re-export the bundle") from exc
    if missing or unexpected:
        raise ModelError(f"bundle {str(root)!r} weights do not fit its own config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}; re-export the bundle")
    return model


@torch.no_grad()
def _check_output_dim(root: Path, card: BundleCard, model: EmbeddingModel) -> None:
    """One forward pass of a blank image: the weights must give vectors of ``card.embedding_dim``."""
    h, w = model.preprocessing.input_size
    out = model.eval()(torch.zeros(1, 3, h, w))
    if out.ndim != 2 or int(out.shape[-1]) != card.embedding_dim:
        raise ModelError(f"bundle {str(root)!r}: {CARD} says embedding_dim={card.embedding_dim} but its weights "
                         f"give vectors of shape {tuple(out.shape[1:])}; re-export the bundle")


class ModelBundle:
    """A loaded model bundle: the card, the model, and batched embedding of images.

    Use :meth:`load`; ``embed`` applies exactly the bundle's preprocessing, so query-time vectors are
    comparable with index-time vectors.
    """

    def __init__(self, path: Path, card: BundleCard, model: EmbeddingModel) -> None:
        self.path = path
        self.card = card
        self.model = model

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu", verify: bool = True) -> ModelBundle:
        """Load a bundle directory.

        ``verify`` checks the card (see :func:`read_card`), the weights hash against the card, and that
        the model the weights build gives vectors of the card's ``embedding_dim``.

        Raises:
            ModelError: a missing, damaged or edited card or weights file, naming the field and the fix
                (re-export the bundle).
        """
        root = Path(path)
        card = read_card(root, verify=verify)
        weights = root / WEIGHTS
        if not weights.is_file():
            raise ModelError(f"bundle {str(root)!r} has no {WEIGHTS}; it is incomplete, re-export it")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelError(f"cannot load {str(weights)!r} safely ({type(exc).__name__}); the file is damaged "
                             f"or not a state dict: re-export the bundle") from exc
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelError(f"{str(weights)!r} holds a {type(state).__name__}, not a state dict of tensors; "
                             f"re-export the bundle")
        if verify:
            digest = _state_sha256(state)
            if digest != card.weights_sha256:
                raise ModelError(f"bundle {str(root)!r}: weights hash {digest[:12]} differs from the card's "
                                 f"{card.weights_sha256[:12]}; the weights were changed after export. "
                                 f"Re-export the bundle")
        model = _build_model(root, card, state)
        if verify:
            _check_output_dim(root, card, model)
        model.eval().to(device)
        return cls(root, card, model)

    @property
    def preprocessing(self) -> Preprocessing:
        """The bundle's preprocessing."""
        return self.card.preprocessing_obj

    @property
    def dim(self) -> int:
        """Embedding size."""
        return self.card.embedding_dim

    def fingerprint(self) -> dict[str, Any]:
        """See :meth:`BundleCard.fingerprint`."""
        return self.card.fingerprint()

    @torch.no_grad()
    def embed_tensor(self, batch: torch.Tensor) -> np.ndarray:
        """Embed an already preprocessed batch (N, 3, H, W)."""
        h, w = self.preprocessing.input_size
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, h, w):
            raise MismatchError(f"batch of shape {tuple(batch.shape)} does not match the bundle's input "
                                f"(N, 3, {h}, {w}); preprocess with the bundle's own preprocessing")
        device = next(self.model.parameters()).device
        out = self.model(batch.to(device)).float().cpu().numpy()
        return np.ascontiguousarray(out, dtype=np.float32)

    def embed(self, images: Sequence[Any], *, batch_size: int = 64) -> np.ndarray:
        """Embed images (paths, encoded bytes or arrays) with the bundle's preprocessing."""
        # deferred: transforms imports albumentations and OpenCV (seconds); the connectors import this module
        # and searching by vector never embeds an image
        from deepfeat.finetune.data.transforms import preprocess_batch

        out = []
        for start in range(0, len(images), batch_size):
            arrays = [load_image(x) for x in images[start:start + batch_size]]
            out.append(self.embed_tensor(preprocess_batch(arrays, self.preprocessing)))
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(out)


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
