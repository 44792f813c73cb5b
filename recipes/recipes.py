"""Recipes: one complete YAML per workflow plus thin glue, run by ``deepfeat recipe run NAME --data PATH``.

A recipe YAML (``recipes/configs/NAME.yaml``) is a LightningCLI config (``trainer``, ``model`` with the
loss and miner spelt out as ``class_path``/``init_args``, ``data``), so ``deepfeat fit --config`` trains
with it as it is, plus a ``recipe:`` section that only ``deepfeat recipe run`` reads: the collection
(name, index, key), the search (top-k, group-by, filter) and the recipe's own action.

``run_recipe`` is the same five steps for every recipe: read the records (the recipe's reader: a
catalogue, DICOM scans, any folder), fine-tune through :func:`~deepfeat.finetune.training.pipeline.finetune`
(the guarded path: the off-the-shelf model is kept when fine-tuning does not beat it), embed every
record with the exported bundle, load it into Milvus, run the recipe's action
(:data:`RECIPES` names the module; it exposes ``read(source, config)`` and ``act(context)``).

The helpers below are shared by the actions: filter expressions with safely quoted values, rows fetched
from a collection, per-query searches that exclude the query's own group (product, patient).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import pandas as pd
import yaml

from deepfeat.finetune.errors import DataError, DeepfeatError

if TYPE_CHECKING:
    from pytorch_metric_learning.losses import BaseMetricLossFunction
    from pytorch_metric_learning.miners import BaseMiner

    from deepfeat.connectors.client import MilvusConnector
    from deepfeat.connectors.schema import KeyMode
    from deepfeat.finetune.models.bundle import ModelBundle
    from deepfeat.finetune.training.pipeline import FinetuneResult, FinetuneSettings

log = logging.getLogger(__name__)

__all__ = [
    "CONFIG_DIR",
    "RECIPES",
    "CollectionOptions",
    "RecipeConfig",
    "RecipeContext",
    "RecipeInfo",
    "RecipeResult",
    "apply_overrides",
    "build_filter",
    "fetch_rows",
    "instantiate",
    "list_images",
    "list_recipes",
    "load_recipe",
    "milvus_literal",
    "pick_queries",
    "read_any",
    "record_image",
    "run_recipe",
    "search_each",
]

#: Where the shipped recipe YAMLs live.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: Recipe name -> the module with its reader and action (``read(source, config)``, ``act(context)``).
RECIPES: dict[str, str] = {
    "fashion": "deepfeat.recipes.fashion",
    "medical": "deepfeat.recipes.medical",
    "dedup": "deepfeat.recipes.dedup",
    "classify": "deepfeat.recipes.classify",
    "cluster": "deepfeat.recipes.cluster",
}

# FinetuneSettings fields read from each LightningCLI section (the rest of `model` has no guarded-path twin)
_MODEL_SETTINGS = (
    "backbone",
    "weights",
    "head",
    "embedding_dim",
    "image_size",
    "lr",
    "head_lr",
    "loss_lr",
    "weight_decay",
    "warmup_steps",
    "l2sp",
    "freeze_bn",
    "frozen_stages",
    "drop_path_rate",
    "progressive_size",
    "progressive_fraction",
    "distill",
    "channels_last",
    "max_minutes",
)
_DATA_SETTINGS = ("preset", "erasing", "p", "k", "batches_per_epoch", "num_workers", "eval_batch_size", "seed")
_DATA_SPLIT_KEYS = ("split_mode", "fractions", "val_fraction", "classes", "limit_per_class", "query_mode")
_TRAINER_SETTINGS = ("max_epochs", "precision", "accelerator")
# model keys the guarded path cannot honour: a warning when they are set to anything but their default
_MODEL_IGNORED = {"layers": None, "min_lr_ratio": 0.01, "gather_across_ranks": True}


class RecipeModule(Protocol):
    """What a recipe module provides."""

    def read(self, source: str, config: RecipeConfig) -> pd.DataFrame:
        """Records (validated) from ``source``."""
        ...

    def act(self, ctx: RecipeContext) -> dict[str, Any]:
        """The recipe's action on the loaded collection; returns a JSON-ready summary (files in ``ctx.out``)."""
        ...


# --------------------------------------------------------------------------------------------------
# configs


@dataclass(frozen=True)
class RecipeInfo:
    """A shipped recipe: its name, one-line description and YAML."""

    name: str
    description: str
    path: Path


def list_recipes(config_dir: str | Path = CONFIG_DIR) -> list[RecipeInfo]:
    """The recipes whose YAML has a ``recipe:`` section, sorted by name."""
    out = []
    for path in sorted(Path(config_dir).glob("*.yaml")):
        raw = _read_yaml(path)
        section = raw.get("recipe")
        if isinstance(section, dict):
            out.append(RecipeInfo(str(section.get("name", path.stem)), str(section.get("description", "")), path))
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(f"cannot read recipe {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise DataError(f"recipe {str(path)!r} is not a YAML mapping (got {type(data).__name__})")
    return data


def _config_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise DataError(f"recipe file {str(path)!r} not found")
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        names = [r.name for r in list_recipes()]
        raise DataError(
            f"unknown recipe {str(name_or_path)!r}; the shipped recipes are {names} "
            f"('deepfeat recipe list'), or pass the path of a recipe .yaml"
        )
    return shipped


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(config: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``config`` with ``key.path=value`` overrides applied (values are parsed as YAML).

    A new key may be added to an existing mapping (``recipe.search.filter='price < 50'``); a path through
    a missing or non-mapping section is refused, so a typo in a section name does not pass silently.

    Raises:
        DataError: an override is not ``key=value`` or its path does not lead into a mapping.
    """
    out = copy.deepcopy(dict(config))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DataError(f"override {item!r} is not key=value; write e.g. --set model.image_size=32")
        parts = key.strip().split(".")
        node: Any = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part) if isinstance(node, dict) else None
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                known = sorted(node) if isinstance(node, dict) else []
                raise DataError(f"override {item!r}: {where!r} is not a section of the recipe; sections here: {known}")
            node = child
        if parts[-1] not in node:
            log.info("override %s adds a new key", key)
        node[parts[-1]] = _parse_value(value)
    return out


def instantiate(spec: Any) -> Any:
    """Build an object from a LightningCLI-style ``{class_path, init_args}`` (nested specs are built too).

    Raises:
        DataError: the class cannot be imported, or its arguments are refused.
    """
    if isinstance(spec, list):
        return [instantiate(v) for v in spec]
    if not isinstance(spec, dict):
        return spec
    if "class_path" not in spec:
        return {k: instantiate(v) for k, v in spec.items()}
    path = str(spec["class_path"])
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise DataError(
            f"class_path {path!r} cannot be imported ({exc}); write the full dotted path, e.g. "
            f"pytorch_metric_learning.losses.MultiSimilarityLoss"
        ) from exc
    args = {k: instantiate(v) for k, v in dict(spec.get("init_args") or {}).items()}
    try:
        return cls(**args)
    except TypeError as exc:
        raise DataError(f"{path} refused init_args {sorted(args)}: {exc}") from exc


@dataclass(frozen=True)
class CollectionOptions:
    """The ``recipe.collection`` section."""

    name: str
    index: str = "AUTOINDEX"
    key: KeyMode = "record_id"


@dataclass
class RecipeConfig:
    """A recipe YAML, read and overridden: accessors for each part ``run_recipe`` needs."""

    name: str
    description: str
    path: Path
    raw: dict[str, Any]

    def section(self, *keys: str) -> dict[str, Any]:
        """A nested mapping (``section("recipe", "search")``), ``{}`` when absent."""
        node: Any = self.raw
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        return dict(node) if isinstance(node, dict) else {}

    @property
    def recipe(self) -> dict[str, Any]:
        """The ``recipe:`` section."""
        return self.section("recipe")

    @property
    def action(self) -> dict[str, Any]:
        """The action's own options (``recipe.<name>``)."""
        return self.section("recipe", self.name)

    @property
    def search(self) -> dict[str, Any]:
        """``recipe.search``: top_k, group_by, filter, n_queries."""
        return self.section("recipe", "search")

    @property
    def train(self) -> bool:
        """``recipe.train``: fine-tune (default) or index with the off-the-shelf backbone."""
        return bool(self.recipe.get("train", True))

    @property
    def collection(self) -> CollectionOptions:
        """``recipe.collection``."""
        c = self.section("recipe", "collection")
        return CollectionOptions(
            str(c.get("name", self.name)),
            str(c.get("index") or "AUTOINDEX"),
            cast("KeyMode", c.get("key", "record_id")),
        )

    def settings(self, *, minutes: float | None = None) -> FinetuneSettings:
        """The :class:`FinetuneSettings` this YAML describes.

        ``model``, ``data`` and ``trainer`` keys map onto the fields of the same name; the freeze epochs,
        early-stopping patience and EMA decay come from the ``FreezeBackbone``, ``EarlyStopping`` and
        ``EMAWeightAveraging`` callbacks (absent callback: no freezing, the default patience, no EMA) and the
        flip TTA and learned whitening from ``ExportBundle`` (``flip_tta``, ``whiten``, ``whiten_regs``,
        ``whiten_per_class``), so
        ``deepfeat fit`` and ``deepfeat recipe run`` train alike; ``recipe.finetune`` sets the rest
        (``guard``, ``exclude_same_group``, ``max_minutes``).

        Raises:
            DataError: a ``recipe.finetune`` key is not a FinetuneSettings field.
        """
        from deepfeat.finetune.training.pipeline import FinetuneSettings

        model, data, trainer = self.section("model"), self.section("data"), self.section("trainer")
        kw: dict[str, Any] = {k: model[k] for k in _MODEL_SETTINGS if k in model}
        kw.update({k: data[k] for k in _DATA_SETTINGS if k in data})
        kw.update({k: trainer[k] for k in _TRAINER_SETTINGS if k in trainer})
        for key, default in _MODEL_IGNORED.items():
            if key in model and model[key] != default:
                log.warning(
                    "model.%s=%r is used by 'deepfeat fit' only; the guarded recipe path ignores it", key, model[key]
                )
        callbacks = {
            str(c.get("class_path", "")).rpartition(".")[2]: dict(c.get("init_args") or {})
            for c in trainer.get("callbacks") or []
            if isinstance(c, dict)
        }
        kw["freeze_epochs"] = int(callbacks["FreezeBackbone"].get("epochs", 1)) if "FreezeBackbone" in callbacks else 0
        if "EarlyStopping" in callbacks:
            kw["patience"] = int(callbacks["EarlyStopping"].get("patience", 3))
        ema = callbacks.get("EMAWeightAveraging")
        kw["ema_decay"] = float(ema.get("decay", 0.999)) if ema is not None else None
        export = callbacks.get("ExportBundle", {})
        for key in ("flip_tta", "whiten", "whiten_regs", "whiten_per_class"):
            if key in export:
                kw[key] = tuple(export[key]) if key == "whiten_regs" else export[key]
        own = self.section("recipe", "finetune")
        names = {f.name for f in dataclasses.fields(FinetuneSettings)}
        unknown = sorted(set(own) - names)
        if unknown:
            raise DataError(
                f"recipe.finetune has unknown key(s) {unknown}; FinetuneSettings fields are {sorted(names)}"
            )
        kw.update(own)
        if minutes is not None:
            kw["max_minutes"] = float(minutes)
        return FinetuneSettings(**kw)

    def data_kwargs(self) -> dict[str, Any]:
        """``data`` keys that shape the splits (``make_datamodule`` keyword arguments)."""
        data = self.section("data")
        kw = {k: data[k] for k in _DATA_SPLIT_KEYS if k in data}
        if "fractions" in kw:
            kw["fractions"] = tuple(kw["fractions"])
        return kw

    def loss(self) -> BaseMetricLossFunction | None:
        """``model.loss``, built (``None``: the module's default)."""
        from pytorch_metric_learning.losses import BaseMetricLossFunction

        spec = self.section("model").get("loss")
        obj = instantiate(spec) if spec else None
        if obj is not None and not isinstance(obj, BaseMetricLossFunction):
            raise DataError(f"model.loss must be a pytorch-metric-learning loss, got {type(obj).__name__}")
        return obj

    def miner(self) -> BaseMiner | None:
        """``model.miner``, built (``None``: no miner)."""
        from pytorch_metric_learning.miners import BaseMiner

        spec = self.section("model").get("miner")
        obj = instantiate(spec) if spec else None
        if obj is not None and not isinstance(obj, BaseMiner):
            raise DataError(f"model.miner must be a pytorch-metric-learning miner, got {type(obj).__name__}")
        return obj


def load_recipe(name_or_path: str | Path, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Read a shipped recipe (by name) or a recipe YAML (by path) and apply ``key=value`` overrides.

    Raises:
        DataError: unknown recipe, unreadable YAML, no ``recipe:`` section, bad overrides.
    """
    path = _config_path(name_or_path)
    raw = apply_overrides(_read_yaml(path), overrides)
    section = raw.get("recipe")
    if not isinstance(section, dict):
        raise DataError(
            f"{str(path)!r} has no 'recipe:' section; it is a plain training config (use "
            f"'deepfeat fit --config'), not a recipe"
        )
    name = str(section.get("name", path.stem))
    if name not in RECIPES:
        raise DataError(f"recipe {str(path)!r} names the action {name!r}; known actions: {sorted(RECIPES)}")
    return RecipeConfig(name, str(section.get("description", "")), path, raw)


def recipe_module(name: str) -> RecipeModule:
    """The module of a recipe's reader and action."""
    return cast(RecipeModule, importlib.import_module(RECIPES[name]))


# --------------------------------------------------------------------------------------------------
# records and images


def read_any(source: str | os.PathLike[str], *, label: str = "unlabelled") -> pd.DataFrame:
    """Records from any source ``read_records`` takes, or from a flat folder of images (one ``label``).

    A folder of loose images (no class sub-folders) is what an unlabelled collection looks like; its
    records all get ``label``.
    """
    from deepfeat.finetune.data.contract import validate_records
    from deepfeat.finetune.data.readers import read_records

    path = Path(source)
    if path.is_dir() and not any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir()):
        files = list_images(path)
        if not files:
            raise DataError(f"no images in {str(path)!r}")
        rows = pd.DataFrame(
            {"id": [Path(f).relative_to(path.absolute()).as_posix() for f in files], "path": files, "label": label}
        )
        return validate_records(rows, root=path.absolute())
    return read_records(os.fspath(source) if isinstance(source, os.PathLike) else source)


def list_images(source: str | os.PathLike[str]) -> list[str]:
    """Image files named by ``source``: a file, a folder (recursively, sorted) or a CSV/Parquet manifest.

    Raises:
        DataError: nothing exists at ``source`` or it holds no image.
    """
    from deepfeat.finetune.data.images import IMAGE_EXTENSIONS

    path = Path(source)
    if path.is_file() and path.suffix.lower() in (".csv", ".parquet", ".pq"):
        from deepfeat.finetune.data.readers import read_manifest

        return [str(p) for p in read_manifest(path)["path"].dropna()]
    if path.is_file():
        return [str(path.absolute())]
    if path.is_dir():
        return sorted(
            str(p.absolute())
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    raise DataError(f"{os.fspath(source)!r} does not exist; pass an image, a folder of images or a manifest")


def record_image(row: Mapping[str, Any] | pd.Series) -> np.ndarray | None:
    """A record's decoded image, or ``None`` when it cannot be read (pictures skip it)."""
    from deepfeat.finetune.data.dataset import record_source
    from deepfeat.finetune.data.images import load_image
    from deepfeat.finetune.errors import DeepfeatError

    try:
        return load_image(record_source(row))  # type: ignore[arg-type]
    except DeepfeatError as exc:
        log.warning("no picture of %s: %s", row.get("id", "?"), exc)
        return None


def pick_queries(
    records: pd.DataFrame,
    n: int,
    *,
    split: str = "test",
    per: str = "label",
    distinct: str | None = "group",
    seed: int = 0,
) -> pd.DataFrame:
    """Up to ``n`` query records of ``split`` (all records when it has none), spread over ``per`` values,
    at most one per ``distinct`` value (one photo per product, one scan per patient)."""
    pool = records[(records["split"] == split) & records["is_query"]] if "is_query" in records else records
    if pool.empty:
        pool = records[records["split"] == split]
    if pool.empty:
        pool = records
    shuffled = pool.sample(frac=1.0, random_state=seed)
    if distinct is not None:
        shuffled = shuffled.drop_duplicates(distinct)
    order = shuffled.groupby(per, sort=True).cumcount()  # round-robin over the classes
    return (
        shuffled.assign(_turn=order.to_numpy()).sort_values(["_turn", per], kind="stable").head(n).drop(columns="_turn")
    )


# --------------------------------------------------------------------------------------------------
# filters and searches


def milvus_literal(value: Any) -> str:
    """A value as a Milvus expression literal; strings through the connector's :func:`quote_string` (quotes,
    backslashes and non-ASCII text are safe).

    Raises:
        DataError: a non-finite number, or a string with a control character Milvus cannot express.
    """
    from deepfeat.connectors.search import quote_string

    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        if not np.isfinite(value):
            raise DataError(f"cannot filter on the non-finite value {value!r}")
        return repr(float(value))
    return quote_string(str(value))


def build_filter(
    *clauses: str | None,
    equals: Mapping[str, Any] | None = None,
    not_equals: Mapping[str, Any] | None = None,
    ranges: Mapping[str, tuple[float | None, float | None]] | None = None,
) -> str | None:
    """A Milvus boolean expression: free ``clauses`` and field conditions, joined with ``and``.

    ``ranges`` maps a field to ``(low, high)`` (inclusive; ``None`` leaves that side open). Values are
    quoted by :func:`milvus_literal`, so ids and labels with quotes are safe. Returns ``None`` when empty.
    """
    parts = [f"({c})" for c in clauses if c]
    for name, value in (equals or {}).items():
        parts.append(f"{name} == {milvus_literal(value)}")
    for name, value in (not_equals or {}).items():
        parts.append(f"{name} != {milvus_literal(value)}")
    for name, (low, high) in (ranges or {}).items():
        if low is not None:
            parts.append(f"{name} >= {milvus_literal(float(low))}")
        if high is not None:
            parts.append(f"{name} <= {milvus_literal(float(high))}")
    return " and ".join(parts) or None


def fetch_rows(
    conn: MilvusConnector, collection: str, record_ids: Sequence[str], fields: Sequence[str] = ("group", "label")
) -> dict[str, dict[str, Any]]:
    """Stored rows of records by id (``pk``, ``record_id``, ``vector`` and ``fields``).

    Raises:
        DataError: some ids are not in the collection (named).
    """
    from deepfeat.connectors.collection import open_collection
    from deepfeat.connectors.schema import PK_FIELD, RECORD_ID_FIELD, VECTOR_FIELD

    spec = open_collection(conn, collection)
    unknown = [f for f in fields if f not in spec.field_names]
    if unknown:
        raise DataError(f"field(s) {unknown} are not in collection {collection!r}; it has {spec.field_names}")
    conn.ensure_loaded(spec.name)
    wanted = list(dict.fromkeys([PK_FIELD, RECORD_ID_FIELD, VECTOR_FIELD, *fields]))
    ids = [str(i) for i in record_ids]
    found: dict[str, dict[str, Any]] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        expr = f"{RECORD_ID_FIELD} in [{', '.join(milvus_literal(i) for i in chunk)}]"
        for row in conn.call("query", conn.client.query, collection, filter=expr, output_fields=wanted):
            found[str(row[RECORD_ID_FIELD])] = dict(row)
    missing = [i for i in ids if i not in found]
    if missing:
        raise DataError(
            f"record id(s) {missing[:5]} are not in collection {collection!r} ({len(missing)} missing); "
            f"ids are the records' 'id' column (for folders, the relative paths)"
        )
    return found


def search_each(
    conn: MilvusConnector,
    collection: str,
    record_ids: Sequence[str],
    *,
    top_k: int = 5,
    filter: str | None = None,
    same: Sequence[str] = (),
    exclude_own_group: bool = False,
    group_by: str | None = "group",
    output_fields: Sequence[str] | None = None,
    search_params: Mapping[str, Any] | None = None,
) -> list[list[dict[str, Any]]]:
    """One search per stored record, by its own vector, never returning the record itself.

    Args:
        filter: a Milvus expression every hit must satisfy.
        same: fields whose value a hit must share with its query (e.g. ``("modality", "body_part")``);
            a query without a value (``""``) is not restricted on that field.
        exclude_own_group: leave out every record of the query's own ``group`` (its patient, its product).
        group_by: one hit per value of this field (``None``: plain top-k).
        output_fields: fields in each hit (default: record_id, label, group, split, path and ``same``).
    """
    from deepfeat.connectors.schema import PK_FIELD, VECTOR_FIELD
    from deepfeat.connectors.search import search_vectors

    needed = list(dict.fromkeys(["group", *same]))
    rows = fetch_rows(conn, collection, record_ids, needed)
    fields = (
        list(output_fields)
        if output_fields is not None
        else list(dict.fromkeys(["record_id", "label", "group", "split", "path", *same]))
    )
    out: list[list[dict[str, Any]]] = []
    for rid in record_ids:
        row = rows[str(rid)]
        expr = build_filter(
            filter,
            not_equals={PK_FIELD: row[PK_FIELD], **({"group": row["group"]} if exclude_own_group else {})},
            equals={f: row[f] for f in same if row.get(f) not in (None, "")},
        )
        vector = np.asarray(row[VECTOR_FIELD], dtype=np.float32)[None, :]
        out.extend(
            search_vectors(
                conn,
                collection,
                vector,
                top_k=top_k,
                filter=expr,
                group_by=group_by,
                output_fields=fields,
                search_params=search_params,
            )
        )
    return out


def iter_collection(
    conn: MilvusConnector, collection: str, fields: Sequence[str], *, filter: str = ""
) -> Iterator[dict[str, Any]]:
    """Every row of a collection (``fields`` plus ``pk``), through a query iterator."""
    from deepfeat.connectors.collection import open_collection
    from deepfeat.connectors.schema import PK_FIELD, VECTOR_FIELD

    spec = open_collection(conn, collection)
    unknown = [f for f in fields if f not in (*spec.field_names, VECTOR_FIELD, PK_FIELD)]
    if unknown:
        raise DataError(f"field(s) {unknown} are not in collection {collection!r}; it has {spec.field_names}")
    yield from conn.iter_rows(spec.name, list(dict.fromkeys([PK_FIELD, *fields])), filter=filter)


def collection_frame(
    conn: MilvusConnector, collection: str, fields: Sequence[str] = ("record_id", "label", "path"), *, filter: str = ""
) -> tuple[pd.DataFrame, np.ndarray]:
    """All rows of a collection as (metadata table, float32 vectors (n, dim)), in key order.

    Raises:
        DataError: the collection (or the filter) holds no rows.
    """
    from deepfeat.connectors.schema import PK_FIELD, VECTOR_FIELD

    rows = sorted(
        iter_collection(conn, collection, [*fields, VECTOR_FIELD], filter=filter), key=lambda r: str(r[PK_FIELD])
    )
    if not rows:
        where = f" matching {filter!r}" if filter else ""
        raise DataError(f"collection {collection!r} holds no rows{where}; load embeddings first ('deepfeat load')")
    vectors = np.asarray([r[VECTOR_FIELD] for r in rows], dtype=np.float32)
    meta = pd.DataFrame([{k: v for k, v in r.items() if k != VECTOR_FIELD} for r in rows])
    return meta, vectors


# --------------------------------------------------------------------------------------------------
# running a recipe


@dataclass
class RecipeContext:
    """What a recipe's action works with: everything is trained, embedded and loaded."""

    config: RecipeConfig
    records: pd.DataFrame
    bundle: ModelBundle
    conn: MilvusConnector
    collection: str
    out: Path
    finetune: FinetuneResult | None = None
    queries: list[str] = field(default_factory=list)
    progress: bool = False

    @property
    def metric(self) -> str:
        """The collection's metric (``COSINE`` for deepfeat bundles)."""
        return str(self.bundle.card.metric)

    def record_by_id(self) -> pd.DataFrame:
        """The records indexed by id, for pictures and lookups."""
        return self.records.set_index(self.records["id"].astype(str), drop=False)


@dataclass
class RecipeResult:
    """What ``run_recipe`` did and wrote (the CLI prints it; ``recipe.json`` in ``out`` holds it too)."""

    name: str
    out: Path
    bundle: Path
    uri: str
    collection: str
    n_records: int
    n_loaded: int
    chosen: str
    guard_message: str
    summary: dict[str, Any]
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**dataclasses.asdict(self), "out": str(self.out), "bundle": str(self.bundle)}


def _off_the_shelf_bundle(settings: FinetuneSettings, out: Path, name: str) -> Path:
    from deepfeat.finetune.models.bundle import export_bundle
    from deepfeat.finetune.models.model import build_embedding_model

    model = build_embedding_model(settings.backbone, settings.weights, head="none", image_size=settings.image_size)
    return export_bundle(
        model,
        out / "bundle",
        name=name,
        overwrite=True,
        onnx=False,
        training={"chosen": "off-the-shelf", "reason": "recipe.train is false"},
    )


def run_recipe(
    name_or_path: str | Path,
    data: str | None = None,
    *,
    out: str | Path | None = None,
    uri: str | None = None,
    overrides: Sequence[str] = (),
    minutes: float | None = None,
    queries: Sequence[str] = (),
    replace: bool | None = None,
    progress: bool = False,
) -> RecipeResult:
    """Read, fine-tune (guarded), embed, load into Milvus and run the recipe's action.

    Args:
        name_or_path: a shipped recipe name (``deepfeat recipe list``) or a recipe YAML.
        data: the data source (default: the YAML's ``data.source``).
        out: output folder (default ``deepfeat-NAME``): the run, the bundle, the action's files, ``recipe.json``.
        uri: Milvus (default: a Milvus Lite database ``out/milvus.db``).
        overrides: ``key.path=value`` changes to the YAML.
        minutes: training budget (wall clock).
        queries: image files for the action (fashion: shop-the-look photos; medical: query scans;
            classify: unlabelled images to label).
        replace: drop an existing collection of the same name first (default: only in the run's own
            database, i.e. when ``uri`` is not given).
        progress: progress bars.

    Raises:
        DataError: no data source, or the collection exists in a given ``uri`` and ``replace`` is off.
    """
    from deepfeat.connectors import connect, drop_collection, load_embeddings
    from deepfeat.finetune.inference.embed import iter_embeddings
    from deepfeat.finetune.models.bundle import ModelBundle
    from deepfeat.finetune.training.pipeline import finetune, make_datamodule, training_workers

    config = load_recipe(name_or_path, overrides)
    module = recipe_module(config.name)
    seconds: dict[str, float] = {}
    t0 = t = time.perf_counter()
    source = data if data is not None else config.section("data").get("source")
    if not source:
        raise DataError(f"recipe {config.name!r} needs data: pass --data PATH (a folder or a manifest)")
    folder = Path(out) if out is not None else Path(f"deepfeat-{config.name}")
    folder.mkdir(parents=True, exist_ok=True)
    records = module.read(str(source), config)
    settings = config.settings(minutes=minutes)
    dm = make_datamodule(records, settings, **config.data_kwargs())
    records = dm.records
    seconds["data"] = time.perf_counter() - t

    t = time.perf_counter()
    result: FinetuneResult | None = None
    if config.train:
        result = finetune(
            dm,
            settings,
            folder / "run",
            loss=config.loss(),
            miner=config.miner(),
            bundle_name=config.name,
            progress=progress,
        )
        if result.bundle is None:  # finetune always exports; keep the type checker honest
            raise DeepfeatError("fine-tuning produced no model bundle; re-run with -vv and report the log")
        bundle_path = result.bundle
    else:
        bundle_path = _off_the_shelf_bundle(settings, folder / "run", config.name)
    bundle = ModelBundle.load(bundle_path)
    seconds["fine-tune"] = time.perf_counter() - t

    t = time.perf_counter()
    coll = config.collection
    own_db = uri is None
    uri = uri or str(folder / "milvus.db")
    conn = connect(uri)
    try:
        if conn.has_collection(coll.name):
            if replace if replace is not None else own_db:
                drop_collection(conn, coll.name)
            else:
                raise DataError(
                    f"collection {coll.name!r} already exists at {conn.display_uri}; pass --replace to "
                    f"rebuild it, or name another one with --set recipe.collection.name=NEW"
                )
        batches = (
            (rows.drop(columns=["image"], errors="ignore"), vectors)
            for rows, vectors in iter_embeddings(
                bundle,
                records,
                batch_size=settings.eval_batch_size,
                num_workers=training_workers(settings),
                progress=progress,
            )
        )
        report = load_embeddings(
            conn,
            coll.name,
            batches,
            bundle=bundle,
            index=coll.index,
            key=coll.key,
            total=len(records),
            progress=progress,
        )
        seconds["embed+load"] = time.perf_counter() - t
        t = time.perf_counter()
        ctx = RecipeContext(config, records, bundle, conn, coll.name, folder, result, list(queries), progress)
        summary = module.act(ctx)
        seconds["action"] = time.perf_counter() - t
    finally:
        conn.close()
    seconds["total"] = time.perf_counter() - t0
    res = RecipeResult(
        name=config.name,
        out=folder,
        bundle=Path(bundle_path),
        uri=uri,
        collection=coll.name,
        n_records=len(records),
        n_loaded=report.final_count,
        chosen=result.chosen if result else "off-the-shelf",
        guard_message=result.message if result else "recipe.train is false: off-the-shelf features",
        summary=summary,
        seconds={k: round(v, 2) for k, v in seconds.items()},
    )
    (folder / "recipe.json").write_text(json.dumps(res.to_dict(), indent=2, default=str))
    log.info("recipe %s done in %.0fs: %s", config.name, seconds["total"], folder)
    return res
