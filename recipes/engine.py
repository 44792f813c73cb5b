"""Running a recipe: the same steps for every recipe, on the objects its YAML describes.

``run_recipe`` reads the records (the recipe's own reader: a catalogue, DICOM scans, any folder), fine-tunes
through :func:`~deepfeat.finetune.training.pipeline.guarded_fit` (the module, data module and trainer parsed from
the YAML; the off-the-shelf model is kept when fine-tuning does not beat it, and both are measured on the held-out
test split), embeds every record with the exported bundle, loads it into Milvus and runs the recipe's action
(:data:`~deepfeat.recipes.config.RECIPES` names the module; it exposes ``read(source, config)`` and
``act(context)``).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import pandas as pd

from deepfeat.connectors import connect, drop_collection, load_embeddings
from deepfeat.connectors.client import MilvusConnector
from deepfeat.finetune.data.dataset import SkipReport
from deepfeat.finetune.errors import DataError
from deepfeat.finetune.models.bundle import ModelBundle, export_bundle
from deepfeat.finetune.models.model import build_embedding_model
from deepfeat.recipes.config import RECIPES, RecipeConfig, load_recipe, load_recipe_name

log = logging.getLogger(__name__)

__all__ = ["RecipeContext", "RecipeModule", "RecipeResult", "recipe_module", "run_recipe"]


class RecipeModule(Protocol):
    """What a recipe module provides."""

    def read(self, source: str, config: RecipeConfig) -> pd.DataFrame:
        """Records (validated) from ``source``."""
        ...

    def act(self, ctx: RecipeContext) -> dict[str, Any]:
        """The recipe's action on the loaded collection; returns a JSON-ready summary (files in ``ctx.out``)."""
        ...


def _index_records(module: RecipeModule, records: pd.DataFrame) -> pd.DataFrame:
    """The records that go into Milvus: all of them, unless the module narrows them (``index_records``)."""
    narrow = getattr(module, "index_records", None)
    return narrow(records) if callable(narrow) else records


def recipe_module(name: str) -> RecipeModule:
    """The module of a recipe's reader and action."""
    return cast(RecipeModule, importlib.import_module(RECIPES[name]))


@dataclass
class RecipeContext:
    """What a recipe's action works with: everything is trained, embedded and loaded."""

    config: RecipeConfig
    records: pd.DataFrame
    bundle: ModelBundle
    conn: MilvusConnector
    collection: str
    out: Path
    finetune: Any = None  # deepfeat.finetune.training.FinetuneResult, None when recipe.train is false
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
    test: dict[str, dict[str, Any]] | None = None
    test_table: str | None = None
    test_message: str = ""
    test_exported: str | None = None  # the test table's row of the exported bundle
    rank: int = 0  # under DDP, this process's rank: only rank 0 exports, embeds, loads and runs the action
    n_skipped: int = 0  # records whose image did not decode: not in Milvus, listed in ``skipped_report``
    skipped_report: str | None = None  # ``skipped.json`` in ``out``: id, source and reason of each

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**dataclasses.asdict(self), "out": str(self.out), "bundle": str(self.bundle)}


def _off_the_shelf_bundle(config: RecipeConfig, out: Path) -> Path:
    hp = config.training.module.hparams
    model = build_embedding_model(hp["backbone"], hp["weights"], head="none", image_size=hp["image_size"],
                                  layers=hp.get("layers"))
    return export_bundle(model, out / "bundle", name=config.name, overwrite=True, onnx=False,
                         training={"chosen": "off-the-shelf", "reason": "recipe.train is false"})


def _embed_and_load(conn: MilvusConnector, config: RecipeConfig, bundle: ModelBundle, records: pd.DataFrame,
                    replace: bool, progress: bool, skipped: SkipReport) -> int:
    from deepfeat.finetune.inference.embed import iter_embeddings

    coll = config.collection
    if conn.has_collection(coll.name):
        if not replace:
            raise DataError(f"collection {coll.name!r} already exists at {conn.display_uri}; pass --replace to "
                            f"rebuild it, or name another one with --set recipe.collection.name=NEW")
        drop_collection(conn, coll.name)
    dm = config.training.datamodule.hparams
    batches = ((rows.drop(columns=["image"], errors="ignore"), vectors)
               for rows, vectors in iter_embeddings(bundle, records, batch_size=int(dm["eval_batch_size"]),
                                                    num_workers=int(dm["num_workers"]), report=skipped,
                                                    progress=progress))
    report = load_embeddings(conn, coll.name, batches, bundle=bundle, index=coll.index, key=coll.key,
                             total=len(records), progress=progress)
    return int(report.final_count)


def run_recipe(name_or_path: str | Path, data: str | None = None, *, out: str | Path | None = None,
               uri: str | None = None, overrides: Sequence[str] = (), minutes: float | None = None,
               queries: Sequence[str] = (), replace: bool | None = None, progress: bool = False) -> RecipeResult:
    """Read, fine-tune (guarded), embed, load into Milvus and run the recipe's action.

    Args:
        name_or_path: a shipped recipe name (``deepfeat recipe list``) or a recipe YAML.
        data: the data source (default: the YAML's ``data.source``).
        out: output folder (default ``deepfeat-NAME``): the run, the bundle, the action's files, ``recipe.json``
            and ``skipped.json`` (the images that did not decode: not loaded; id, source and reason of each).
        uri: Milvus (default: a Milvus Lite database ``out/milvus.db``).
        overrides: ``key.path=value`` changes to the YAML (checked by the parser: a typo is refused).
        minutes: training budget (wall clock), i.e. ``model.max_minutes``.
        queries: image files for the action (fashion: shop-the-look photos; medical: query scans;
            classify: unlabelled images to label).
        replace: drop an existing collection of the same name first (default: only in the run's own
            database, i.e. when ``uri`` is not given).
        progress: progress bars.

    Raises:
        DataError: no data source, a refused config, or the collection exists in a given ``uri`` and ``replace``
            is off.
    """
    seconds: dict[str, float] = {}
    t0 = t = time.perf_counter()
    extra = [*overrides, *([f"model.max_minutes={float(minutes)}"] if minutes is not None else [])]
    name = load_recipe_name(name_or_path)
    folder = Path(out) if out is not None else Path(f"deepfeat-{name}")
    folder.mkdir(parents=True, exist_ok=True)
    config = load_recipe(name_or_path, extra, args=[f"--trainer.enable_progress_bar={str(progress).lower()}",
                                                    "--trainer.enable_model_summary=false",
                                                    f"--trainer.default_root_dir={folder / 'run'}"])
    module = recipe_module(config.name)
    source = data if data is not None else config.section("data").get("source")
    if not source:
        raise DataError(f"recipe {config.name!r} needs data: pass --data PATH (a folder or a manifest)")
    training = config.training
    training.set_out_dir(folder / "run")
    training.datamodule.use_records(module.read(str(source), config))
    records = training.datamodule.records
    seconds["data"] = time.perf_counter() - t

    t = time.perf_counter()
    result = training.fit() if config.train else None
    if config.train and not training.trainer.is_global_zero:  # a DDP rank > 0: its share of the training is done
        rank = training.trainer.global_rank
        log.info("recipe %s: rank %d done; rank 0 exports, embeds, loads and runs the action", config.name, rank)
        return RecipeResult(name=config.name, out=folder, bundle=training.bundle_dir, uri="",
                            collection=config.collection.name, n_records=len(records), n_loaded=0, chosen="",
                            guard_message=f"rank {rank}: rank 0 chooses and exports the model", summary={},
                            seconds={"fine-tune": round(time.perf_counter() - t, 2)}, rank=rank)
    bundle_path = result.bundle if result is not None and result.bundle else _off_the_shelf_bundle(config,
                                                                                                   folder / "run")
    bundle = ModelBundle.load(bundle_path)
    seconds["fine-tune"] = time.perf_counter() - t

    t = time.perf_counter()
    own_db = uri is None
    uri = uri or str(folder / "milvus.db")
    conn = connect(uri)
    try:
        rebuild = replace if replace is not None else own_db
        skipped = SkipReport()
        n_loaded = _embed_and_load(conn, config, bundle, _index_records(module, records), rebuild, progress,
                                   skipped)
        skipped_report = skipped.write(folder / "skipped.json")  # written, empty or not: a run's full account
        seconds["embed+load"] = time.perf_counter() - t
        t = time.perf_counter()
        ctx = RecipeContext(config, records, bundle, conn, config.collection.name, folder, result, list(queries),
                            progress)
        summary = module.act(ctx)
        seconds["action"] = time.perf_counter() - t
        shown_uri = conn.display_uri
    finally:
        conn.close()
    seconds["total"] = time.perf_counter() - t0
    res = RecipeResult(
        name=config.name, out=folder, bundle=Path(bundle_path), uri=shown_uri, collection=config.collection.name,
        n_records=len(records), n_loaded=n_loaded, chosen=result.chosen if result else "off-the-shelf",
        guard_message=result.message if result else "recipe.train is false: off-the-shelf features",
        summary=summary, seconds={k: round(v, 2) for k, v in seconds.items()},
        test=result.test if result else None, test_table=result.test_table() if result else None,
        test_message=result.test_message if result else "recipe.train is false: no fine-tuning to measure",
        test_exported=result.test_exported if result else None, n_skipped=len(skipped),
        skipped_report=str(skipped_report))
    (folder / "recipe.json").write_text(json.dumps(res.to_dict(), indent=2, default=str))
    log.info("recipe %s done in %.0fs: %s", config.name, seconds["total"], folder)
    return res
