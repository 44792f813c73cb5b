"""Retrieval quality: off-the-shelf vs fine-tuned EfficientNet-Lite0 on Fashion-MNIST, two protocols.

* ``same``: train on the official train split (a validation split is carved from it),
  query/gallery = the official test split, all-vs-all (leave-one-out).
* ``disjoint``: train on classes 0-4 (T-shirt/top, Trouser, Pullover, Dress, Coat), evaluate on the
  unseen classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot) of the official test split.

Two kinds of rows, each marked in the table:

* ``shipped recipe`` (``--recipe recipes/configs/fashion.yaml``, or a shipped recipe's name): the YAML a user
  runs, unchanged except the data (the protocol's records, ``data.split_mode=as_is`` so its train/test split is
  kept; the YAML's own ``data.limit_per_class`` and validation carving apply to the training images, the
  protocol's test split is kept whole) and the seed (``seed_everything``, ``data.seed``). The figures are the
  recipe's own before/after on the held-out test split (the ``ExportBundle`` callback's test measurement).
* ``tuned protocol`` (no ``--recipe``): the settings of the command line (loss, input size, flip TTA,
  whitening, layers, distillation, ...) written over ``recipes/configs/fashion.yaml`` into a YAML of each run
  (``OUT/PROTOCOL-seedN/config.yaml``: the loss section spelt out whole), parsed by the same LightningCLI parser
  and fitted through the same guarded pipeline. The ``off-the-shelf`` row is the issue's baseline, the
  pretrained backbone's pooled penultimate layer at the same input size; with ``--layers`` a second baseline
  row shows the selected layers untrained, with ``--flip-tta``/``--whiten`` the fine-tuned model is also shown
  without them.

Prints one table per protocol with the mean and spread over seeds, and the wall time.

Full-size commands (2 CPU cores). The shipped recipe, both protocols, within its own budget
(``model.max_minutes: 10``):

    python benchmarks/quality.py --recipe recipes/configs/fashion.yaml --protocol same disjoint --seeds 0 1 2 \
        --json runs/quality-recipe.json

The tuned protocol rows measured for benchmarks/README.md (each run under 20 minutes; measured with the
pipeline before the config port, not yet re-run on it):

    # same classes: CosFace (margin 0.2, proxies at 10 x lr) + Multi-Similarity, 64 px, backbone trained with
    # its BatchNorm, flip-only augmentation, no frozen epoch, 17 min of training; flip test-time augmentation
    # and a learned whitening chosen on validation (about 18.3-18.6 min of fine-tuning, Recall@1 0.9209 +- 0.0020;
    # the test evaluation of the five rows adds about 3.7 min, of which the exported model's own is 45 s)
    python benchmarks/quality.py --protocol same --seeds 0 1 2 --loss cosface+ms --margin 0.2 --loss-lr 1e-2 \
        --image-size 64 --minutes 17 --lr 1e-3 --head-lr 1e-2 --train-bn --preset flip --batches-per-epoch 300 \
        --k 12 --freeze-epochs 0 --flip-tta --whiten
    # unseen classes: mid-level layers (picked on held-out training classes), relational distillation
    python benchmarks/quality.py --protocol disjoint --seeds 0 1 2 --loss ms --image-size 48 --minutes 4 \
        --layers 4 5 --distill 10 --lr 1e-4 --num-workers 2

Smoke runs (a minute each; they prove the paths run, their figures mean nothing):

    python benchmarks/quality.py --recipe fashion --protocol same disjoint --seeds 0 --limit-per-class 20 \
        --minutes 0.2 --out /tmp/quality-smoke
    python benchmarks/quality.py --protocol same disjoint --seeds 0 --limit-per-class 20 --minutes 0.2 \
        --loss cosface+ms --image-size 32 --flip-tta --whiten --layers 4 5 --distill 1 --out /tmp/quality-smoke

API gap: ``MetricLearningModule(loss=...)`` is typed ``BaseMetricLossFunction``, which PML's ``MultipleLosses``
and ``CrossBatchMemory`` are not, so the parser refuses ``cosface+ms``/``cosface+xbm`` in a YAML. For those two,
the YAML spells out the CosFace part whole and this script wraps it with the pair loss after parsing
(:func:`combine_loss`), before anything copies the module.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import logging
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from pytorch_metric_learning import losses, miners

from deepfeat.finetune.data.readers import FASHION_MNIST_CLASSES, read_fashion_mnist
from deepfeat.finetune.data.splits import sample_per_class
from deepfeat.finetune.inference.embed import auto_num_workers
from deepfeat.finetune.inference.evaluate import evaluate_models, off_the_shelf
from deepfeat.finetune.metrics import format_metrics_table
from deepfeat.finetune.models.bundle import ModelBundle
from deepfeat.finetune.models.model import EmbeddingModel, build_embedding_model
from deepfeat.finetune.training import FinetuneResult, MetricLearningModule, RetrievalDataModule
from deepfeat.finetune.training.whiten import whiten_model
from deepfeat.recipes.config import CONFIG_DIR, RecipeConfig, load_recipe, resolve_config

KEYS = ("recall_at_1", "recall_at_5", "map_at_r", "map")
RECIPE_MARK = "shipped recipe"
TUNED_MARK = "tuned protocol"
#: The issue's baseline row: the pretrained backbone's pooled penultimate layer, one view, the run's input size.
BASELINE = "off-the-shelf (pooled penultimate, single view)"
#: The YAML the tuned protocol's settings are written over (its callbacks, recipe section, defaults).
TUNED_BASE = CONFIG_DIR / "fashion.yaml"
#: Parser arguments of every run: no progress bars or model summaries in a benchmark's log.
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
Spec = dict[str, Any]


def spec(class_path: str, **init_args: Any) -> Spec:
    """A ``class_path``/``init_args`` mapping, as a YAML spells an object out."""
    return {"class_path": class_path, "init_args": init_args}


def loss_specs(name: str, n_classes: int, dim: int, margin: float | None = None) -> tuple[Spec, Spec | None]:
    """The YAML ``model.loss`` and ``model.miner`` sections of the loss named on the command line, spelt out whole.

    ``margin`` overrides the ArcFace (degrees) or CosFace (cosine) margin. For ``cosface+ms``/``cosface+xbm``
    it is the CosFace part; :func:`combine_loss` adds the pair loss after parsing (see the module's API gap).
    """
    pml = "pytorch_metric_learning"
    if name == "ms":
        return (spec(f"{pml}.losses.MultiSimilarityLoss", alpha=2.0, beta=50.0, base=0.5),
                spec(f"{pml}.miners.MultiSimilarityMiner", epsilon=0.1))
    if name == "arcface":
        return spec(f"{pml}.losses.ArcFaceLoss", num_classes=n_classes, embedding_size=dim,
                    margin=margin or 28.6, scale=30.0), None
    if name in ("cosface", "cosface+ms", "cosface+xbm"):
        return spec(f"{pml}.losses.CosFaceLoss", num_classes=n_classes, embedding_size=dim,
                    margin=margin or 0.35, scale=30.0), None
    if name == "proxyanchor":
        return spec(f"{pml}.losses.ProxyAnchorLoss", num_classes=n_classes, embedding_size=dim,
                    margin=0.1, alpha=32.0), None
    if name == "supcon":
        return spec(f"{pml}.losses.SupConLoss", temperature=0.1), None
    raise SystemExit(f"unknown loss {name!r}")


def combine_loss(module: MetricLearningModule, name: str, dim: int, memory: int = 1200) -> None:
    """``cosface+ms``/``+xbm``: the parsed CosFace loss plus Multi-Similarity pairs, as the module's loss.

    Class proxies for the coarse layout, pairs in the batch for the neighbourhoods; ``+xbm``: the pairs are also
    mined against the last ``memory`` embeddings (cross-batch memory, Wang et al. 2020). Called before fit, so
    the optimizer and the EMA copy see the combined loss.
    """
    if name not in ("cosface+ms", "cosface+xbm"):
        return
    cosface = module.loss_fn
    ms, miner = losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5), miners.MultiSimilarityMiner(epsilon=0.1)
    combined: Any
    if name == "cosface+ms":
        combined = losses.MultipleLosses({"cosface": cosface, "ms": ms}, miners={"ms": miner})
    else:
        xbm = losses.CrossBatchMemory(ms, embedding_size=dim, memory_size=memory, miner=miner)
        combined = losses.MultipleLosses({"cosface": cosface, "xbm": xbm})
    module.loss_fn = combined


def protocol_records(protocol: str, args: argparse.Namespace, seed: int, *, tuned: bool) -> pd.DataFrame:
    """The protocol's records: official train/test (``disjoint``: classes 0-4 train, 5-9 test).

    ``tuned``: with ``--disjoint-val classes`` two of the five training classes become the validation split
    (model selection on classes the model never trains on); the shipped recipe validates as its YAML says.
    """
    records = read_fashion_mnist(args.data, limit_per_class=args.limit_per_class)
    if args.test_limit_per_class:
        test = records[records["split"] == "test"]
        keep = sample_per_class(test, args.test_limit_per_class, seed=0)
        records = pd.concat([records[records["split"] != "test"], keep])
    if protocol != "disjoint":
        return records
    train_classes = set(FASHION_MNIST_CLASSES[:5])
    is_train = records["split"] == "train"
    records = records[(is_train & records["label"].isin(train_classes))
                      | (~is_train & ~records["label"].isin(train_classes))].copy()
    if tuned and args.disjoint_val == "classes":
        val_classes = set(FASHION_MNIST_CLASSES[3:5])
        moved = (records["split"] == "train") & records["label"].isin(val_classes)
        records.loc[moved, "split"] = "val"
        val_rows = records[records["split"] == "val"]
        drop = val_rows.index.difference(sample_per_class(val_rows, args.val_per_class, seed=seed).index)
        records = records.drop(index=drop)
    return records


def eval_device() -> str:
    """Where the benchmark's own test embeddings are computed (the trainer's ``accelerator: auto`` picks alike)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def workers(value: int | str) -> int:
    """``--num-workers``, ``auto`` resolved as the embed engine resolves it (none on 2 cores or fewer)."""
    return auto_num_workers(eval_device()) if value == "auto" else int(value)


def run_recipe_one(protocol: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """``--recipe``: the shipped YAML unchanged but for the protocol's data and the seed; its own test table."""
    path = resolve_config(args.recipe)
    data_yaml = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
    out = Path(args.out) / f"recipe-{path.stem}-{protocol}-seed{seed}"
    # the data module keeps the protocol's split (as_is) and no longer subsamples it: the YAML's limit is applied
    # below, to the training images only, so that every row is measured on the same whole test split
    budget = [] if args.minutes is None else [f"model.max_minutes={args.minutes}"]  # smoke runs only
    if args.budget_epochs:  # a shared machine: whole epochs instead of the wall clock (the README says which)
        budget = ["model.max_minutes=null", f"trainer.max_epochs={args.budget_epochs}"]
    config = load_recipe(path, [f"seed_everything={seed}", f"data.seed={seed}", "data.split_mode=as_is",
                                "data.limit_per_class=null", *budget],
                         args=[*QUIET, f"--trainer.default_root_dir={out}"])
    training = config.training
    training.set_out_dir(out)
    records = protocol_records(protocol, args, seed, tuned=False)
    accepted = set(inspect.signature(RetrievalDataModule.__init__).parameters) - {"self", "source"}
    hp = {k: v for k, v in training.datamodule.hparams.items() if k in accepted}  # not the parser's own keys
    hp["limit_per_class"] = data_yaml.get("limit_per_class")
    # train and val exactly as the YAML's data section makes them from these training images (val carving,
    # its limit per class and split), then the protocol's test split beside them
    # (the test split is there while validation is carved, as in a user's manifest: data.val_mode auto reads it)
    carved = RetrievalDataModule.from_records(records, **hp).records
    fit_part = carved[carved["split"] != "test"]
    # without query/gallery columns, so that the data module assigns them to val and test as the YAML's query_mode says
    both = pd.concat([fit_part, records[records["split"] == "test"]], ignore_index=True)
    training.datamodule.use_records(both.drop(columns=["is_query", "is_gallery"], errors="ignore"))
    start, machine = time.perf_counter(), contention()
    result = training.fit()
    wall = time.perf_counter() - start
    if not result.test:
        raise SystemExit(f"{path}: no held-out test figures ({result.test_message}); the recipe's ExportBundle "
                         f"needs test: true")
    rows = {f"{RECIPE_MARK}: {name}": dict(metrics) for name, metrics in result.test.items()}
    # the model the guard kept, whichever it is (the summary's row that the goals are read on)
    rows[f"{RECIPE_MARK}: exported"] = dict(result.test[result.test_exported or result.chosen])
    # the baseline beside the recipe's own (which reads the recipe's layers, with its flip TTA): the pooled
    # penultimate layer of the pretrained backbone at the same input size, one view
    dm = training.datamodule
    rows[f"{RECIPE_MARK}: {BASELINE}"] = evaluate_models(
        {BASELINE: penultimate(result.model)}, dm.split_records("test"),
        batch_size=int(dm.hparams["eval_batch_size"]), num_workers=int(dm.hparams["num_workers"]),
        device=eval_device())[BASELINE]
    logging.getLogger("quality").info("%s seed %d: %s; %s", protocol, seed, result.message, result.test_message)
    return {"rows": rows, "meta": {**meta(result, wall, config, out), **contention(machine)}}


def contention(since: dict[str, float] | None = None) -> dict[str, float]:
    """The machine's load while a run trained: load averages, and CPU seconds this process (and its reaped
    workers) got against the wall time, so that a run on a shared machine says how much of it it had."""
    usage = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    now = {"cpu_seconds": sum(u.ru_utime + u.ru_stime for u in usage), "wall": time.perf_counter(),
           "load_1min": os.getloadavg()[0]}
    if since is None:
        return now
    return {"load_1min_start": since["load_1min"], "load_1min_end": now["load_1min"],
            "cpu_seconds": round(now["cpu_seconds"] - since["cpu_seconds"], 1),
            "cpu_share": round((now["cpu_seconds"] - since["cpu_seconds"]) / max(now["wall"] - since["wall"], 1e-9)
                               / (os.cpu_count() or 1), 3)}


def meta(result: FinetuneResult, wall: float, config: RecipeConfig | None, out: Path) -> dict[str, Any]:
    """What a run did besides its figures: the model kept and why, steps, times, whitening, the config."""
    return {"chosen": result.chosen, "message": result.message, "test_message": result.test_message,
            "steps": result.steps, "epochs": result.epochs, "finetune_seconds": result.seconds,
            "wall_seconds": wall, "whitening": result.whitening,
            "config": str(config.path) if config is not None else None, "out": str(out)}


def tuned_yaml(args: argparse.Namespace, seed: int, n_classes: int) -> dict[str, Any]:
    """The tuned protocol's settings written over :data:`TUNED_BASE` (a whole YAML, loss spelt out)."""
    cfg = yaml.safe_load(TUNED_BASE.read_text())
    cfg["seed_everything"] = seed
    trainer = cfg["trainer"]
    trainer.update(precision=args.precision, max_epochs=args.epochs)
    callbacks = []
    for cb in trainer["callbacks"]:
        kind = cb["class_path"].rsplit(".", 1)[-1]
        init = cb.setdefault("init_args", {})
        if kind == "FreezeBackbone":
            if args.freeze_epochs <= 0:
                continue
            init["epochs"] = args.freeze_epochs
        elif kind == "EMA":
            if not args.ema:
                continue
            init["decay"] = args.ema
        elif kind == "ExportBundle":
            # the benchmark measures every row on the test split itself (the callback's own test pass would
            # embed it twice more)
            init.update(flip_tta=args.flip_tta, whiten=args.whiten, test=False, onnx=False)
        callbacks.append(cb)
    trainer["callbacks"] = callbacks
    loss, miner = loss_specs(args.loss, n_classes, args.dim, args.margin)
    cfg["model"].update(
        backbone=args.backbone, embedding_dim=args.dim, image_size=args.image_size, layers=args.layers, lr=args.lr,
        head_lr=args.head_lr, loss_lr=args.loss_lr, warmup_steps=args.warmup_steps, l2sp=args.l2sp,
        freeze_bn=not args.train_bn, distill=args.distill, max_minutes=6.0 if args.minutes is None else args.minutes,
        frozen_stages=args.frozen_stages,
        drop_path_rate=args.drop_path, progressive_size=args.progressive_size,
        progressive_fraction=args.progressive_fraction, loss=loss, miner=miner)
    cfg["data"].update(split_mode="as_is", limit_per_class=None, val_fraction=args.val_fraction, preset=args.preset,
                       erasing=args.erasing, p=args.p, k=args.k, batches_per_epoch=args.batches_per_epoch,
                       num_workers=workers(args.num_workers), seed=seed, query_mode="all_vs_all")
    return cfg  # type: ignore[no-any-return]


def run_tuned_one(protocol: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One protocol, one seed of the tuned settings: every row on the test queries/gallery."""
    records = protocol_records(protocol, args, seed, tuned=True)
    val_fraction = 0.0 if (records["split"] == "val").any() else args.val_fraction
    out = Path(args.out) / f"{protocol}-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    n_classes = int(records.loc[records["split"] == "train", "label"].nunique())
    cfg = tuned_yaml(args, seed, n_classes)
    cfg["data"]["val_fraction"] = val_fraction
    config_path = out / "config.yaml"
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    config = load_recipe(config_path, args=[*QUIET, f"--trainer.default_root_dir={out}"])
    training = config.training
    training.set_out_dir(out)
    combine_loss(training.module, args.loss, args.dim, args.memory)
    training.datamodule.use_records(records)
    dm = training.datamodule
    start = time.perf_counter()
    result = from_bundle(out, dm, args, seed) if args.from_bundles else training.fit()
    test = dm.split_records("test")
    models = {"off-the-shelf": penultimate(result.model)}
    if args.layers:  # the stricter baseline too: the very layers the fine-tuned model reads, untrained
        models[f"off-the-shelf, layers {','.join(map(str, args.layers))}"] = off_the_shelf(result.model)
    if args.flip_tta:  # the baseline as is, and with the same averaging of the mirrored view
        models["off-the-shelf + flip TTA"] = penultimate(result.model, flip_tta=True)
    models.update(ablations(result.model, args.flip_tta, args.whiten))
    models["fine-tuned"] = result.model
    rows = evaluate_models(models, test, batch_size=int(dm.hparams["eval_batch_size"]),
                           num_workers=int(dm.hparams["num_workers"]), device=eval_device())
    _, plain_name = ablation_names(args.flip_tta, args.whiten)
    if plain_name and plain_name not in rows:  # no whitening chosen: the exported model is the plain one
        rows = {**{k: v for k, v in rows.items() if k != "fine-tuned"}, plain_name: dict(rows["fine-tuned"]),
                "fine-tuned": rows["fine-tuned"]}
    wall = time.perf_counter() - start + (result.seconds if args.from_bundles else 0.0)
    logging.getLogger("quality").info("%s seed %d: %s", protocol, seed, result.message)
    return {"rows": {f"{TUNED_MARK}: {k}": v for k, v in rows.items()}, "meta": meta(result, wall, config, out)}


def ablation_names(flip_tta: bool, whiten: bool) -> tuple[str | None, str | None]:
    """The table's rows for the fine-tuned model without its flip TTA and/or whitening, as the run asked.

    The names follow the settings, not what validation chose, so that every seed has the same rows
    (one seed may keep a whitening that another declines).
    """
    single = ("fine-tuned, single view" + (", no whitening" if whiten else "")) if flip_tta else None
    plain = ("fine-tuned" + (" + flip TTA" if flip_tta else "") + ", no whitening") if whiten else None
    return single, plain


def ablations(model: EmbeddingModel, flip_tta: bool, whiten: bool) -> dict[str, EmbeddingModel]:
    """The fine-tuned model without its test-time flip and/or learned whitening, for the table.

    The row without whitening is left out when validation chose none: it is then the exported model
    itself, and the caller copies that row's figures instead of embedding the test split again.
    """
    single_name, plain_name = ablation_names(flip_tta, whiten)
    rows: dict[str, EmbeddingModel] = {}
    if single_name and model.flip_tta:
        single = copy.deepcopy(model)
        single.set_flip_tta(False)
        single.set_whitening(None, None)
        rows[single_name] = single
    if plain_name and model.whitened:
        plain = copy.deepcopy(model)
        plain.set_whitening(None, None)
        rows[plain_name] = plain
    return rows


def from_bundle(out: Path, dm: RetrievalDataModule, args: argparse.Namespace, seed: int) -> FinetuneResult:
    """``--from-bundles``: the model a previous run of the same command exported to ``out``, no training.

    Its flip TTA is set as ``--flip-tta`` says, and a learned whitening is fitted again with ``--whiten``
    (``whiten_model``, as the ExportBundle callback does), so one trained model can be evaluated several ways.
    """
    bundle = ModelBundle.load(out / "bundle")
    model, training = bundle.model, bundle.card.training
    model.set_flip_tta(args.flip_tta)
    model.set_whitening(None, None)
    whitening = None
    if args.whiten:
        choice = whiten_model(model, dm.split_records("train"), dm.split_records("val"), seed=seed,
                              batch_size=int(dm.hparams["eval_batch_size"]),
                              num_workers=int(dm.hparams["num_workers"]), device=eval_device())
        model.cpu()
        whitening = choice.summary()
    return FinetuneResult(model=model, chosen=training["chosen"], val={}, seconds=float(training["seconds"]),
                          epochs=int(training["epochs"]), steps=int(training["steps"]), best_checkpoint=None,
                          message=f"from {out / 'bundle'}; whitening {whitening}", whitening=whitening)


def penultimate(model: EmbeddingModel, flip_tta: bool = False) -> EmbeddingModel:
    """The issue's baseline: the pretrained backbone's pooled penultimate layer, same preprocessing as ``model``."""
    base = build_embedding_model(model.backbone.name, "imagenet", head="none")
    base.backbone.preprocessing = model.preprocessing
    base.set_flip_tta(flip_tta)
    return base


def parse_layer(text: str) -> int | str:
    """A ``--layers`` item: an intermediate layer index or ``head``."""
    return text if text == "head" else int(text)


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and population std over seeds for each model and metric."""
    table: dict[str, dict[str, float]] = {}
    for model in runs[0]["rows"]:
        row: dict[str, float] = {}
        for key in KEYS:
            values = [float(r["rows"][model][key]) for r in runs]
            row[key] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
        table[model] = row
    return table


def parse_args() -> argparse.Namespace:
    """The command line (the tuned protocol's flags are ignored with ``--recipe``, but for the data's)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=None,
                        help="a shipped recipe's name or YAML (recipes/configs/fashion.yaml): run it unchanged but for "
                             "the protocol's data and the seed; without it, the tuned protocol's settings below")
    parser.add_argument("--protocol", nargs="+", default=["same", "disjoint"], choices=["same", "disjoint"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--loss", default="arcface",
                        choices=["ms", "arcface", "cosface", "cosface+ms", "cosface+xbm", "proxyanchor", "supcon"])
    parser.add_argument("--memory", type=int, default=1200,
                        help="cosface+xbm: embeddings kept in the cross-batch memory (10 batches of 120)")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0",
                        help="tf_efficientnet_lite0/1/2 (installed ImageNet weights) or another timm name")
    parser.add_argument("--precision", default="32-true", help="Lightning precision: 32-true, bf16-mixed (GPU)")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", nargs="+", type=parse_layer, default=None,
                        help="read the globally pooled features of these layers (ints, 'head'), as 'deepfeat "
                             "layers' picks them; the table then also shows these layers untrained")
    parser.add_argument("--minutes", type=float, default=None,
                        help="training budget per run (model.max_minutes); tuned rows: default 6; with --recipe "
                             "the YAML's own unless given (smoke runs)")
    parser.add_argument("--budget-epochs", type=int, default=None,
                        help="--recipe on a shared machine: train this many whole epochs (the YAML's "
                             "batches_per_epoch) instead of its wall-clock budget (model.max_minutes off), so that "
                             "other jobs' load changes the time a run takes, not its step count")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batches-per-epoch", type=int, default=100)
    parser.add_argument("--p", type=int, default=10)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--head-lr", type=float, default=3e-3)
    parser.add_argument("--drop-path", type=float, default=0.0,
                        help="stochastic depth rate of the backbone's blocks while training (timm drop_path_rate)")
    parser.add_argument("--progressive-size", type=int, default=None,
                        help="progressive resizing: train at this size for the first --progressive-fraction "
                             "of the run, then at --image-size")
    parser.add_argument("--progressive-fraction", type=float, default=0.5)
    parser.add_argument("--l2sp", type=float, default=0.0)
    parser.add_argument("--distill", type=float, default=0.0)
    parser.add_argument("--ema", type=float, default=0.99, help="EMA decay of the weights; 0: no EMA callback")
    parser.add_argument("--preset", default="fashion", choices=["fashion", "flip", "shift", "none"],
                        help="training augmentation (finetune.data.transforms)")
    parser.add_argument("--erasing", type=float, default=0.0, help="random erasing probability in training")
    parser.add_argument("--flip-tta", action="store_true",
                        help="the fine-tuned model embeds each image and its mirror (ExportBundle flip_tta); "
                             "the table adds the single-view model and the baseline with the same averaging")
    parser.add_argument("--whiten", action="store_true",
                        help="fit a learned whitening on the training images, kept when it helps on validation "
                             "(ExportBundle whiten); the table adds the model without it")
    parser.add_argument("--from-bundles", action="store_true",
                        help="no training: evaluate the bundles a previous run of the same command exported "
                             "under --out (with this run's --flip-tta and --whiten); wall time is then the "
                             "training run's plus this run's whitening and evaluation")
    parser.add_argument("--train-bn", action="store_true", help="let BatchNorm statistics adapt")
    parser.add_argument("--loss-lr", type=float, default=None, help="lr of the loss's class proxies (default 100 x lr)")
    parser.add_argument("--margin", type=float, default=None, help="ArcFace (degrees) / CosFace margin")
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--freeze-epochs", type=int, default=1)
    parser.add_argument("--frozen-stages", type=int, default=0,
                        help="backbone stages (the stem counts as one) kept at their pretrained values")
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--disjoint-val", choices=["classes", "images"], default="classes",
                        help="disjoint protocol, tuned rows: validate on held-out training classes, or images")
    parser.add_argument("--val-per-class", type=int, default=600)
    parser.add_argument("--limit-per-class", type=int, default=None,
                        help="subsample train and test when reading (both kinds of rows; for smoke runs)")
    parser.add_argument("--test-limit-per-class", type=int, default=None)
    parser.add_argument("--num-workers", type=lambda v: v if v == "auto" else int(v), default="auto",
                        help="DataLoader workers of the tuned rows; auto: none on 2 cores or fewer")
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--json", default=None)
    return parser.parse_args()


def main() -> None:
    """Command-line entry point."""
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    mark = f"{RECIPE_MARK} {resolve_config(args.recipe)}" if args.recipe else TUNED_MARK
    report: dict[str, Any] = {"args": vars(args), "rows": mark, "protocols": {}}

    def save() -> None:  # after every seed: a run of an hour keeps what it measured if a later part fails
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, default=str))

    run_one = run_recipe_one if args.recipe else run_tuned_one
    for protocol in args.protocol:
        runs: list[dict[str, Any]] = []
        report["protocols"][protocol] = {"runs": runs}
        for seed in args.seeds:
            runs.append(run_one(protocol, seed, args))
            save()
        table = summarise(runs)
        report["protocols"][protocol]["summary"] = table
        walls = [r["meta"]["wall_seconds"] for r in runs]
        steps = [r["meta"]["steps"] for r in runs]
        tuning = [r["meta"]["finetune_seconds"] for r in runs]
        what = "" if args.recipe else f"loss {args.loss}; {args.image_size}px; "
        print(f"\n== {protocol}, {mark} ({what}seeds {args.seeds}; steps per run {steps}; "
              f"fine-tuning (training, validation, guard, whitening) per run {statistics.fmean(tuning) / 60:.1f} min; "
              f"wall per run with the test evaluation {statistics.fmean(walls) / 60:.1f} min)")
        print(format_metrics_table(table, [k for key in KEYS for k in (key, f"{key}_std")], delta=False))
        print("chosen per seed:", [r["meta"]["chosen"] for r in runs])
        if args.recipe:
            print("held-out test per seed:", [r["meta"]["test_message"] for r in runs])
            print("machine per seed (CPU share of its cores while fitting, 1-min load at start and end):",
                  [(r["meta"]["cpu_share"], r["meta"]["load_1min_start"], r["meta"]["load_1min_end"]) for r in runs])
        save()


if __name__ == "__main__":
    main()
