"""``deepfeat quickstart``: the whole job on the embedded defaults, offline, in minutes on a CPU.

The quickstart is a recipe (``recipes/configs/quickstart.yaml``) run by the same engine as every other
(:func:`deepfeat.recipes.engine.run_recipe`): safe fine-tuning (frozen warm-up, EMA, model selection, the baseline
guard), the before/after table on the held-out test split (off-the-shelf EfficientNet-Lite0 vs the model it
fine-tuned), the test gallery embedded and loaded into Milvus Lite, and a few searches drawn as a picture: each
query beside its top-k hits, framed green / red.

Data: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, or any image folder
(one sub-folder per class) given with ``--data``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from deepfeat.connectors import search_ids
from deepfeat.finetune.data.dataset import record_source
from deepfeat.finetune.data.images import load_image
from deepfeat.finetune.data.readers import read_fashion_mnist, read_records
from deepfeat.finetune.data.splits import sample_per_class, split_by_group
from deepfeat.finetune.errors import DataError
from deepfeat.recipes.config import RecipeConfig
from deepfeat.recipes.engine import RecipeContext, run_recipe
from deepfeat.recipes.viz import result_grid

log = logging.getLogger(__name__)

COLLECTION = "quickstart"


@dataclass
class QuickstartOptions:
    """Knobs of the quickstart, each a ``--set`` override of ``quickstart.yaml``; the defaults are the YAML's."""

    data: str | None = None
    out: str = "deepfeat-quickstart"
    train_per_class: int | None = 500
    test_per_class: int | None = 100
    image_size: int = 48
    minutes: float = 4.0
    max_epochs: int = 8
    batches_per_epoch: int = 60
    n_queries: int = 6
    top_k: int = 6
    num_workers: int = 2
    seed: int = 0
    progress: bool = True
    extra: list[str] = field(default_factory=list)

    @classmethod
    def full(cls, **kw: Any) -> QuickstartOptions:
        """A fuller run: all of Fashion-MNIST, 64 px, a longer training budget (better on a GPU)."""
        base: dict[str, Any] = {"train_per_class": None, "test_per_class": None, "image_size": 64,
                                "minutes": 20.0, "max_epochs": 40, "batches_per_epoch": 150}
        base.update(kw)
        return cls(**base)

    def overrides(self) -> list[str]:
        """The options as ``key=value`` overrides of the recipe YAML (``extra`` last, so it wins)."""
        def value(v: Any) -> str:
            return "null" if v is None else str(v)

        return [f"model.image_size={self.image_size}", f"model.max_minutes={self.minutes}",
                f"trainer.max_epochs={self.max_epochs}", f"data.batches_per_epoch={self.batches_per_epoch}",
                f"data.num_workers={self.num_workers}", f"data.seed={self.seed}", f"seed_everything={self.seed}",
                f"recipe.quickstart.train_per_class={value(self.train_per_class)}",
                f"recipe.quickstart.test_per_class={value(self.test_per_class)}",
                f"recipe.quickstart.n_queries={self.n_queries}", f"recipe.quickstart.top_k={self.top_k}",
                *self.extra]


@dataclass
class QuickstartResult:
    """What the quickstart measured and wrote."""

    table: str
    metrics: dict[str, dict[str, Any]]
    chosen: str
    guard_message: str
    bundle: Path
    milvus_uri: str
    collection: str
    n_loaded: int
    picture: Path
    searches: list[dict[str, Any]]
    seconds: dict[str, float]
    test_message: str = ""
    rank: int = 0  # under DDP, this process's rank: only rank 0 measures, loads, draws and writes quickstart.json
    n_skipped: int = 0  # images that did not decode: not loaded, listed in ``skipped_report``
    skipped_report: str | None = None


def read(source: str, config: RecipeConfig) -> pd.DataFrame:
    """Fashion-MNIST's own train/test split sampled per class, or a class folder split 50/25/25 within classes."""
    opts = config.action
    seed = int(config.section("data").get("seed", 0))
    if source in ("", "fashion-mnist"):
        records = read_fashion_mnist()  # says how to install the Debian package when missing
        parts = [sample_per_class(records[records["split"] == split], opts.get(f"{split}_per_class"), seed=seed)
                 for split in ("train", "test")]
        return pd.concat(parts).reset_index(drop=True)
    records = read_records(source)
    if records["label"].nunique() < 2:
        raise DataError(f"{source!r} has {records['label'].nunique()} class(es); the quickstart needs a folder "
                        f"with one sub-folder per class and at least 2 classes")
    records = sample_per_class(records, opts.get("train_per_class"), seed=seed)
    # A folder has no official split: split within classes, keeping groups whole.
    return split_by_group(records.reset_index(drop=True), fractions=(0.5, 0.25, 0.25), seed=seed)


def index_records(records: pd.DataFrame) -> pd.DataFrame:
    """Only the test gallery goes into Milvus: the searches are the test queries against it."""
    test = records[records["split"] == "test"]
    return test[test["is_gallery"]].reset_index(drop=True)


def act(ctx: RecipeContext) -> dict[str, Any]:
    """A few test queries searched by their own vector (themselves excluded), drawn as a picture."""
    opts = ctx.config.action
    test = ctx.records[ctx.records["split"] == "test"]
    queries = test[test["is_query"]]
    rng = np.random.default_rng(int(ctx.config.section("data").get("seed", 0)))
    picks = queries.iloc[rng.choice(len(queries), size=min(int(opts["n_queries"]), len(queries)), replace=False)]
    hits = search_ids(ctx.conn, ctx.collection, picks["id"].astype(str).tolist(), top_k=int(opts["top_k"]),
                      output_fields=["record_id", "label"])
    by_id = test.set_index(test["id"].astype(str))
    drawn, searches = [], []
    for (_, q), q_hits in zip(picks.iterrows(), hits, strict=True):
        drawn.append({"image": load_image(record_source(q)), "label": q["label"],
                      "hits": [{"image": load_image(record_source(by_id.loc[h["record_id"]])),
                                "label": h["label"], "score": float(h["score"])} for h in q_hits]})
        searches.append({"query": str(q["id"]), "label": str(q["label"]),
                         "hits": [{"id": h["record_id"], "label": h["label"], "score": float(h["score"])}
                                  for h in q_hits]})
    chosen = ctx.finetune.chosen if ctx.finetune is not None else "off-the-shelf"
    picture = result_grid(drawn, ctx.out / "quickstart_results.png",
                          title=f"deepfeat quickstart: top-{opts['top_k']} hits ({chosen} model)")
    return {"picture": str(picture), "searches": searches}


def run_quickstart(opts: QuickstartOptions) -> QuickstartResult:
    """Run the quickstart recipe and return what it measured (the CLI prints it)."""
    res = run_recipe("quickstart", opts.data or "fashion-mnist", out=opts.out, overrides=opts.overrides(),
                     progress=opts.progress)
    if res.rank:  # a DDP rank > 0 (Lightning re-ran this command in it): its share of the training is done
        return QuickstartResult(table="", metrics={}, chosen="", guard_message=res.guard_message, bundle=res.bundle,
                                milvus_uri="", collection=res.collection, n_loaded=0, picture=Path(),
                                searches=[], seconds=res.seconds, rank=res.rank)
    if res.test is None or res.test_table is None:
        raise DataError(f"the quickstart measured no held-out test split ({res.test_message})")
    out = QuickstartResult(table=res.test_table, metrics=res.test, chosen=res.chosen, guard_message=res.guard_message,
                           bundle=res.bundle, milvus_uri=res.uri, collection=res.collection, n_loaded=res.n_loaded,
                           picture=Path(res.summary["picture"]), searches=res.summary["searches"],
                           seconds=res.seconds, test_message=res.test_message, n_skipped=res.n_skipped,
                           skipped_report=res.skipped_report)
    (Path(opts.out) / "quickstart.json").write_text(json.dumps({**asdict(out), "bundle": str(out.bundle),
                                                               "picture": str(out.picture)}, indent=2, default=str))
    return out

