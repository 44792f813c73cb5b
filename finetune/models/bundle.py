"""Model bundles: a directory that carries everything a query needs.

``card.json`` (backbone, embedding dim, metric, exact preprocessing, training summary, metrics),
``model.pt`` (state dict, loaded with ``weights_only=True``), and where the backbone allows,
``model.ts`` (TorchScript) and ``model.onnx``. This module does not import Lightning, so the Milvus
connector can load bundles without the training stack. The card itself (:class:`BundleCard`, :func:`read_card`,
:func:`check_compatible`) lives in the torch-free :mod:`deepfeat.finetune.models.card` and is re-exported here.
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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepfeat.finetune.data.images import load_image
from deepfeat.finetune.errors import MismatchError, ModelError
from deepfeat.finetune.models.backbones import Preprocessing
from deepfeat.finetune.models.card import (
    CARD,
    FORMAT_VERSION,
    HASHED_FIELDS,
    REQUIRED_FIELDS,
    BundleCard,
    card_digest,
    check_compatible,
    read_card,
)
from deepfeat.finetune.models.model import EmbeddingModel
from deepfeat.finetune.redaction import MASK, redact

__all__ = ["CARD", "FORMAT_VERSION", "HASHED_FIELDS", "ONNX", "REQUIRED_FIELDS", "TORCHSCRIPT", "WEIGHTS", "BundleCard",
           "ModelBundle", "card_digest", "check_compatible", "export_bundle", "read_card"]

log = logging.getLogger(__name__)

WEIGHTS = "model.pt"
TORCHSCRIPT = "model.ts"
ONNX = "model.onnx"


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

    def embed(self, images: Sequence[Any], *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Embed images (paths, encoded bytes or arrays) with the bundle's preprocessing.

        Args:
            images: image files, encoded bytes or HxWxC arrays.
            batch_size: images per forward pass.
            progress: a progress bar over the batches (on stderr).
        """
        # deferred: transforms imports albumentations and OpenCV (seconds); the connectors import this module
        # and searching by vector never embeds an image
        from tqdm.auto import tqdm

        from deepfeat.finetune.data.transforms import preprocess_batch

        out = []
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc=f"embedding {len(images)} image(s)", unit="batch", disable=not progress):
            arrays = [load_image(x) for x in images[start:start + batch_size]]
            out.append(self.embed_tensor(preprocess_batch(arrays, self.preprocessing)))
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(out)
