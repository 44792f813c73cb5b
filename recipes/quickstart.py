"""``deepfeat quickstart``: the whole job on the embedded defaults, offline, in minutes on a CPU.

1. off-the-shelf EfficientNet-Lite0 embeddings evaluated on a query/gallery test split;
2. safe fine-tuning with the fashion recipe (frozen warm-up, EMA, model selection, baseline guard);
3. evaluation again, both rows side by side;
4. the gallery embedded and loaded into Milvus Lite;
5. a few searches, drawn as a picture: each query beside its top-k hits, framed green / red.

Data: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, or any image folder
(one sub-folder per class) given with ``--data``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from deepfeat.finetune.errors import DataError, DeepfeatError

log = logging.getLogger(__name__)

COLLECTION = "quickstart"


@dataclass
class QuickstartOptions:
    """Knobs of the quickstart; the defaults fit in a few minutes on 2 CPU cores."""

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
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def full(cls, **kw: Any) -> QuickstartOptions:
        """A fuller run: all of Fashion-MNIST, 64 px, a longer training budget (better on a GPU)."""
        base: dict[str, Any] = {"train_per_class": None, "test_per_class": None, "image_size": 64,
                                "minutes": 20.0, "max_epochs": 40, "batches_per_epoch": 150}
        base.update(kw)
        return cls(**base)


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


def _records(opts: QuickstartOptions) -> tuple[pd.DataFrame, dict[str, Any]]:
    from deepfeat.finetune.data.readers import read_fashion_mnist, read_records
    from deepfeat.finetune.data.splits import sample_per_class

    if opts.data in (None, "fashion-mnist"):
        records = read_fashion_mnist()  # says how to install the Debian package when missing
        parts = []
        for split, limit in (("train", opts.train_per_class), ("test", opts.test_per_class)):
            part = records[records["split"] == split]
            parts.append(sample_per_class(part, limit, seed=opts.seed))
        return pd.concat(parts).reset_index(drop=True), {"val_fraction": 0.1}
    records = read_records(opts.data)
    if records["label"].nunique() < 2:
        raise DataError(f"{opts.data!r} has {records['label'].nunique()} class(es); the quickstart needs a folder "
                        f"with one sub-folder per class and at least 2 classes")
    records = sample_per_class(records, opts.train_per_class, seed=opts.seed)
    # A folder has no official split: split within classes, keeping groups whole.
    return records.reset_index(drop=True), {"split_mode": "by_group", "fractions": (0.6, 0.15, 0.25)}


def run_quickstart(opts: QuickstartOptions) -> QuickstartResult:
    """Run the five steps and return what they measured (the CLI prints it)."""
    from deepfeat.connectors import connect, load_embeddings, search_ids
    from deepfeat.finetune.data.images import load_image
    from deepfeat.finetune.inference.embed import iter_embeddings
    from deepfeat.finetune.inference.evaluate import evaluate_models, off_the_shelf
    from deepfeat.finetune.metrics import format_metrics_table
    from deepfeat.finetune.models.bundle import ModelBundle
    from deepfeat.finetune.training.pipeline import FinetuneSettings, finetune, make_datamodule
    from deepfeat.recipes.viz import result_grid

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    records, data_kw = _records(opts)
    settings = FinetuneSettings(image_size=opts.image_size, max_minutes=opts.minutes, max_epochs=opts.max_epochs,
                                batches_per_epoch=opts.batches_per_epoch, num_workers=opts.num_workers,
                                seed=opts.seed, preset="fashion", lr=3e-4, head_lr=3e-3, **opts.extra)
    dm = make_datamodule(records, settings, **data_kw)
    test = dm.split_records("test")
    seconds["data"] = time.perf_counter() - t0

    # 1-3: off-the-shelf vs fine-tuned on the test queries/gallery.
    from pytorch_metric_learning import losses

    t = time.perf_counter()
    # ArcFace (additive angular margin, Deng et al. CVPR 2019) converged fastest of the tested losses on
    # CPU budgets; the fashion recipe YAML spells out MultiSimilarity for open catalogues.
    n_classes = int(dm.split_records("train")["label"].nunique())
    loss = losses.ArcFaceLoss(num_classes=n_classes, embedding_size=settings.embedding_dim or 256, margin=28.6,
                              scale=30)
    result = finetune(dm, settings, out / "run", loss=loss, bundle_name="quickstart", progress=opts.progress)
    seconds["fine-tune"] = time.perf_counter() - t
    t = time.perf_counter()
    metrics = evaluate_models({"off-the-shelf": off_the_shelf(result.model), "fine-tuned": result.model}, test,
                              batch_size=256, num_workers=opts.num_workers)
    seconds["evaluate"] = time.perf_counter() - t
    table = format_metrics_table(metrics, delta=True)

    # 4: embed the gallery with the exported bundle and load it into Milvus Lite.
    t = time.perf_counter()
    if result.bundle is None:  # finetune always exports; keep the type checker honest
        raise DeepfeatError("fine-tuning produced no model bundle; re-run with -vv and report the log")
    bundle = ModelBundle.load(result.bundle)
    gallery = test[test["is_gallery"]].reset_index(drop=True)
    uri = str(out / "milvus.db")
    conn = connect(uri)
    try:
        batches = ((rows.drop(columns=["image"], errors="ignore"), vec)
                   for rows, vec in iter_embeddings(bundle, gallery, batch_size=128, num_workers=opts.num_workers))
        report = load_embeddings(conn, COLLECTION, batches, bundle=bundle, total=len(gallery),
                                 progress=opts.progress)
        seconds["load"] = time.perf_counter() - t

        # 5: searches by id (each query's own vector, itself excluded), drawn as a picture.
        t = time.perf_counter()
        rng = np.random.default_rng(opts.seed)
        queries = test[test["is_query"]]
        picks = queries.iloc[rng.choice(len(queries), size=min(opts.n_queries, len(queries)), replace=False)]
        hits = search_ids(conn, COLLECTION, picks["id"].astype(str).tolist(), top_k=opts.top_k,
                          output_fields=["record_id", "label"])
    finally:
        conn.close()
    by_id = test.set_index(test["id"].astype(str))
    from deepfeat.finetune.data.dataset import record_source

    drawn = []
    searches = []
    for (_, q), q_hits in zip(picks.iterrows(), hits, strict=True):
        drawn.append({"image": load_image(record_source(q)), "label": q["label"],
                      "hits": [{"image": load_image(record_source(by_id.loc[h["record_id"]])),
                                "label": h["label"], "score": h["score"]} for h in q_hits]})
        searches.append({"query": str(q["id"]), "label": str(q["label"]),
                         "hits": [{"id": h["record_id"], "label": h["label"], "score": h["score"]} for h in q_hits]})
    picture = result_grid(drawn, out / "quickstart_results.png",
                          title=f"deepfeat quickstart: top-{opts.top_k} hits ({result.chosen} model)")
    seconds["search"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    res = QuickstartResult(table=table, metrics=metrics, chosen=result.chosen, guard_message=result.message,
                           bundle=result.bundle, milvus_uri=uri, collection=COLLECTION,
                           n_loaded=report.final_count, picture=picture, searches=searches, seconds=seconds)
    (out / "quickstart.json").write_text(json.dumps({**asdict(res), "bundle": str(res.bundle),
                                                     "picture": str(res.picture)}, indent=2, default=str))
    return res


def _cmd_quickstart(args: argparse.Namespace) -> int:
    kw: dict[str, Any] = {"data": args.data, "out": args.out, "progress": not args.quiet, "seed": args.seed,
                          "num_workers": args.num_workers}
    if args.minutes is not None:
        kw["minutes"] = args.minutes
    opts = QuickstartOptions.full(**kw) if args.full else QuickstartOptions(**kw)
    if args.tiny:
        opts.train_per_class, opts.test_per_class, opts.image_size = 24, 12, 32
        opts.max_epochs, opts.batches_per_epoch, opts.num_workers = 2, 4, 0
    print(f"deepfeat quickstart: data={opts.data or 'fashion-mnist'} out={opts.out} "
          f"(training budget {opts.minutes:g} min; --full for a longer run)")
    res = run_quickstart(opts)
    print("\nRetrieval on the test split (queries vs gallery, leave-one-out):")
    print(res.table)
    print(f"\n{res.guard_message}")
    print(f"bundle:     {res.bundle}")
    print(f"milvus:     {res.milvus_uri} collection {res.collection!r} ({res.n_loaded} vectors)")
    print(f"picture:    {res.picture}")
    print("time (s):   " + ", ".join(f"{k} {v:.0f}" for k, v in res.seconds.items()))
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``deepfeat quickstart``."""
    p = sub.add_parser("quickstart", help="off-the-shelf vs fine-tuned, load into Milvus Lite, search, picture")
    p.add_argument("--data", default=None, help="an image folder (one sub-folder per class); default Fashion-MNIST")
    p.add_argument("--out", default="deepfeat-quickstart", help="output folder (bundle, Milvus Lite db, picture)")
    p.add_argument("--minutes", type=float, default=None, help="training budget in minutes")
    p.add_argument("--full", action="store_true", help="all of Fashion-MNIST at 64 px, 20 minutes of training")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_cmd_quickstart)
