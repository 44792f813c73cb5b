"""Retrieval quality: off-the-shelf vs fine-tuned EfficientNet-Lite0 on Fashion-MNIST, two protocols.

* ``same``: train on the official train split (a validation split is carved from it by the pipeline),
  query/gallery = the official test split, all-vs-all (leave-one-out).
* ``disjoint``: train on classes 0-4 (T-shirt/top, Trouser, Pullover, Dress, Coat), evaluate on the
  unseen classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot) of the official test split.

Prints one table per protocol with the mean and spread over seeds, and the wall time. The
``off-the-shelf`` row is the issue's baseline, the pretrained backbone's pooled penultimate layer at the
same input size; with ``--layers`` a second baseline row shows the selected layers untrained.

The settings measured for benchmarks/README.md (2 CPU cores, each run under 20 minutes):

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
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import pandas as pd
from pytorch_metric_learning import losses, miners

from deepfeat.finetune.data.readers import FASHION_MNIST_CLASSES, read_fashion_mnist
from deepfeat.finetune.data.splits import sample_per_class
from deepfeat.finetune.inference.evaluate import evaluate_models, off_the_shelf
from deepfeat.finetune.metrics import format_metrics_table
from deepfeat.finetune.models.bundle import ModelBundle
from deepfeat.finetune.models.model import EmbeddingModel, build_embedding_model
from deepfeat.finetune.training.pipeline import (
    FinetuneResult,
    FinetuneSettings,
    evaluation_device,
    finetune,
    make_datamodule,
    training_workers,
)
from deepfeat.finetune.training.whiten import whiten_model

KEYS = ("recall_at_1", "recall_at_5", "map_at_r", "map")


def make_loss(name: str, n_classes: int, dim: int, margin: float | None = None,
              memory: int = 1200) -> tuple[Any, Any]:
    """The loss (and miner) named on the command line, spelt out whole; ``margin`` overrides the
    ArcFace (degrees) or CosFace (cosine) margin, ``memory`` is the cross-batch memory's size (``+xbm``)."""
    if name == "ms":
        return losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5), miners.MultiSimilarityMiner(epsilon=0.1)
    if name == "arcface":
        return losses.ArcFaceLoss(num_classes=n_classes, embedding_size=dim, margin=margin or 28.6, scale=30), None
    if name == "cosface":
        return losses.CosFaceLoss(num_classes=n_classes, embedding_size=dim, margin=margin or 0.35, scale=30), None
    if name == "proxyanchor":
        return losses.ProxyAnchorLoss(num_classes=n_classes, embedding_size=dim, margin=0.1, alpha=32), None
    if name in ("cosface+ms", "cosface+xbm"):
        # class proxies for the coarse layout, pairs in the batch for the neighbourhoods; +xbm: the pairs
        # are also mined against the last `memory` embeddings (cross-batch memory, Wang et al. 2020)
        cosface, _ = make_loss("cosface", n_classes, dim, margin)
        ms, miner = make_loss("ms", n_classes, dim)
        if name == "cosface+ms":
            return losses.MultipleLosses({"cosface": cosface, "ms": ms}, miners={"ms": miner}), None
        xbm = losses.CrossBatchMemory(ms, embedding_size=dim, memory_size=memory, miner=miner)
        return losses.MultipleLosses({"cosface": cosface, "xbm": xbm}), None
    if name == "supcon":
        return losses.SupConLoss(temperature=0.1), None
    raise SystemExit(f"unknown loss {name!r}")


def run_one(protocol: str, seed: int, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """One protocol, one seed: off-the-shelf and fine-tuned metrics on the test queries/gallery."""
    records = read_fashion_mnist(args.data, limit_per_class=args.limit_per_class)
    if args.test_limit_per_class:
        test = records[records["split"] == "test"]
        keep = sample_per_class(test, args.test_limit_per_class, seed=0)
        records = pd.concat([records[records["split"] != "test"], keep])
    val_fraction = args.val_fraction
    if protocol == "disjoint":
        train_classes = set(FASHION_MNIST_CLASSES[:5])
        is_train = records["split"] == "train"
        records = records[(is_train & records["label"].isin(train_classes))
                          | (~is_train & ~records["label"].isin(train_classes))].copy()
        if args.disjoint_val == "classes":
            # Model selection on classes the model never trains on: the closest proxy, on seen data,
            # for retrieval of unseen classes. Two of the five training classes become validation.
            val_classes = set(FASHION_MNIST_CLASSES[3:5])
            moved = (records["split"] == "train") & records["label"].isin(val_classes)
            records.loc[moved, "split"] = "val"
            val_rows = records[records["split"] == "val"]
            drop = val_rows.index.difference(sample_per_class(val_rows, args.val_per_class, seed=seed).index)
            records = records.drop(index=drop)
            val_fraction = 0.0
    settings = FinetuneSettings(image_size=args.image_size, embedding_dim=args.dim, layers=args.layers,
                                max_epochs=args.epochs,
                                max_minutes=args.minutes, batches_per_epoch=args.batches_per_epoch,
                                lr=args.lr, head_lr=args.head_lr, l2sp=args.l2sp, seed=seed, distill=args.distill,
                                num_workers=args.num_workers, ema_decay=args.ema or None,
                                freeze_epochs=args.freeze_epochs, frozen_stages=args.frozen_stages,
                                drop_path_rate=args.drop_path, p=args.p, k=args.k,
                                progressive_size=args.progressive_size,
                                progressive_fraction=args.progressive_fraction,
                                freeze_bn=not args.train_bn, preset=args.preset, erasing=args.erasing,
                                loss_lr=args.loss_lr,
                                warmup_steps=args.warmup_steps, precision=args.precision,
                                backbone=args.backbone, flip_tta=args.flip_tta, whiten=args.whiten)
    dm = make_datamodule(records, settings, val_fraction=val_fraction)
    out = Path(args.out) / f"{protocol}-seed{seed}"
    start = time.perf_counter()
    if args.from_bundles:
        result = from_bundle(out, dm, settings)
    else:
        n_classes = dm.split_records("train")["label"].nunique()
        loss, miner = make_loss(args.loss, n_classes, args.dim, args.margin, args.memory)
        result = finetune(dm, settings, out, loss=loss, miner=miner)
    test = dm.split_records("test")
    models = {"off-the-shelf": penultimate(result.model)}
    if args.layers:  # the stricter baseline too: the very layers the fine-tuned model reads, untrained
        models[f"off-the-shelf, layers {','.join(map(str, args.layers))}"] = off_the_shelf(result.model)
    if args.flip_tta:  # the baseline as is, and with the same averaging of the mirrored view
        models["off-the-shelf + flip TTA"] = penultimate(result.model, flip_tta=True)
    models.update(ablations(result.model, settings.flip_tta, settings.whiten))
    models["fine-tuned"] = result.model
    rows = evaluate_models(models, test, batch_size=256, num_workers=training_workers(settings),
                           device=evaluation_device(settings.accelerator))
    _, plain_name = ablation_names(settings.flip_tta, settings.whiten)
    if plain_name and plain_name not in rows:  # no whitening chosen: the exported model is the plain one
        rows = {**{k: v for k, v in rows.items() if k != "fine-tuned"}, plain_name: dict(rows["fine-tuned"]),
                "fine-tuned": rows["fine-tuned"]}
    rows["fine-tuned"]["chosen"] = result.chosen  # type: ignore[assignment]
    rows["fine-tuned"]["wall_seconds"] = time.perf_counter() - start
    rows["fine-tuned"]["steps"] = result.steps  # type: ignore[assignment]
    rows["fine-tuned"]["finetune_seconds"] = result.seconds
    if args.from_bundles:
        rows["fine-tuned"]["wall_seconds"] += result.seconds
    rows["fine-tuned"]["whitening"] = result.whitening  # type: ignore[assignment]
    logging.getLogger("quality").info("%s seed %d: %s", protocol, seed, result.message)
    return rows


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


def from_bundle(out: Path, dm: Any, settings: FinetuneSettings) -> FinetuneResult:
    """``--from-bundles``: the model a previous run of the same command exported to ``out``, no training.

    Its flip TTA is set as the settings say, and a learned whitening is fitted again when they ask for
    one (``whiten_model``, as ``finetune`` does), so one trained model can be evaluated several ways.
    """
    bundle = ModelBundle.load(out / "bundle")
    model, training = bundle.model, bundle.card.training
    model.set_flip_tta(settings.flip_tta)
    model.set_whitening(None, None)
    whitening = None
    if settings.whiten:
        choice = whiten_model(model, dm.split_records("train"), dm.split_records("val"),
                              regs=settings.whiten_regs, per_class=settings.whiten_per_class, seed=settings.seed,
                              batch_size=settings.eval_batch_size, num_workers=training_workers(settings),
                              device=evaluation_device(settings.accelerator))
        model.cpu()
        whitening = {"reg": choice.reg}
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


def summarise(runs: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Mean and population std over seeds for each model and metric."""
    table: dict[str, dict[str, float]] = {}
    for model in runs[0]:
        row: dict[str, float] = {}
        for key in KEYS:
            values = [float(r[model][key]) for r in runs]
            row[key] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
        table[model] = row
    return table


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    parser.add_argument("--minutes", type=float, default=6.0, help="training budget per run")
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
    parser.add_argument("--ema", type=float, default=0.99)
    parser.add_argument("--preset", default="fashion", choices=["fashion", "flip", "shift", "none"],
                        help="training augmentation (finetune.transforms)")
    parser.add_argument("--erasing", type=float, default=0.0, help="random erasing probability in training")
    parser.add_argument("--flip-tta", action="store_true",
                        help="the fine-tuned model embeds each image and its mirror (EmbeddingModel flip_tta); "
                             "the table adds the single-view model and the baseline with the same averaging")
    parser.add_argument("--whiten", action="store_true",
                        help="fit a learned whitening on the training images, kept when it helps on validation "
                             "(finetune.whiten); the table adds the model without it")
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
                        help="disjoint protocol: validate on held-out training classes, or held-out images")
    parser.add_argument("--val-per-class", type=int, default=600)
    parser.add_argument("--limit-per-class", type=int, default=None, help="subsample train and test")
    parser.add_argument("--test-limit-per-class", type=int, default=None)
    parser.add_argument("--num-workers", type=lambda v: v if v == "auto" else int(v), default="auto",
                        help="DataLoader workers; auto: none on 2 cores or fewer (they take the model's cores)")
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    report: dict[str, Any] = {"args": vars(args), "protocols": {}}

    def save() -> None:  # after every seed: a run of an hour keeps what it measured if a later part fails
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, default=float))

    for protocol in args.protocol:
        runs: list[dict[str, dict[str, Any]]] = []
        report["protocols"][protocol] = {"runs": runs}
        for seed in args.seeds:
            runs.append(run_one(protocol, seed, args))
            save()
        table = summarise(runs)
        report["protocols"][protocol]["summary"] = table
        walls = [r["fine-tuned"]["wall_seconds"] for r in runs]
        steps = [r["fine-tuned"]["steps"] for r in runs]
        tuning = [r["fine-tuned"]["finetune_seconds"] for r in runs]
        print(f"\n== {protocol} ({args.backbone}; seeds {args.seeds}; loss {args.loss}; {args.image_size}px; "
              f"steps per run {steps}; "
              f"fine-tuning (training, validation, guard, whitening) per run {statistics.fmean(tuning) / 60:.1f} min; "
              f"wall per run with the test evaluation {statistics.fmean(walls) / 60:.1f} min)")
        print(format_metrics_table(table, [k for key in KEYS for k in (key, f"{key}_std")], delta=False))
        print("chosen per seed:", [r["fine-tuned"]["chosen"] for r in runs])
        save()


if __name__ == "__main__":
    main()
