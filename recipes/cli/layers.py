"""``deepfeat layers``: which layer's features retrieve best, and the full-network embedding (off the shelf).

The sweep is :func:`deepfeat.recipes.layers.layer_report`; this module parses its options and prints its table.
"""

from __future__ import annotations

import argparse

from deepfeat.recipes.cli.arguments import device, int_at_least, out_dir, resolve_device, workers

__all__ = ["add_cli", "run"]

#: --backbone left out: the default of deepfeat.finetune.models.backbones (not imported here: it imports torch).
_DEFAULT_BACKBONE_HELP = "timm model name (default: the installed EfficientNet-Lite0, tf_efficientnet_lite0)"


def run(args: argparse.Namespace) -> int:
    """Handler of ``deepfeat layers``: run the sweep and print the table, the storage report and the files."""
    from deepfeat.finetune.inference.runtime import resolve_num_workers
    from deepfeat.finetune.models.backbones import DEFAULT_BACKBONE
    from deepfeat.finetune.models.fne import DEFAULT_THRESHOLDS, format_storage_report
    from deepfeat.recipes.layers import format_table, layer_report

    thresholds = tuple(args.thresholds) if args.thresholds else DEFAULT_THRESHOLDS
    dev = resolve_device(args.device)
    num_workers = resolve_num_workers(args.num_workers, device=dev)  # checked before any work
    print(f"deepfeat layers: {args.backbone or DEFAULT_BACKBONE} on {args.data} (reading the data, then one pass of "
          f"the network over the evaluated and the reference images)", flush=True)
    report = layer_report(args.data, args.out, backbone=args.backbone or DEFAULT_BACKBONE, weights=args.weights,
                          image_size=args.image_size, split=args.split, limit_per_class=args.limit_per_class,
                          reference=args.reference, mode=args.mode, thresholds=thresholds, bundle=args.bundle,
                          save_fne=args.save_fne, overwrite=args.overwrite, batch_size=args.batch_size,
                          num_workers=num_workers, device=dev, seed=args.seed,
                          progress=not args.quiet)
    result = report.result
    print(report.title)
    print(f"FNE statistics from {result.reference['n_images']} images of split {result.reference['split']} "
          f"({result.reference['n_zero_variance']} features without variance); thresholds {thresholds}")
    print(format_table(result.table))
    print("* best single layer (chosen on this split)")
    fne_dim = int(result.fne_model.embedding_dim)
    print(f"\nStorage of the {fne_dim}-d full-network embedding for {report.n_vectors} vectors:")
    print(format_storage_report(fne_dim, report.n_vectors))
    if report.fne_bundle is not None:
        print(f"FNE bundle (statistics included) written to {report.fne_bundle}")
    print(f"wrote {report.csv} and {report.picture} in {report.seconds:.1f} s "
          f"({', '.join(f'{k} {v:.1f}' for k, v in result.timings.items())})")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``deepfeat layers``."""
    p = sub.add_parser(
        "layers",
        help="retrieval quality of each layer and of the full-network embedding (off the shelf)",
        description="Early layers of a CNN carry generic features, late layers task-specific ones. The sweep "
        "measures, off the shelf, the retrieval quality (Recall@K, MAP@R) of each layer's pooled features, of all "
        "layers concatenated and of the full-network embedding (arXiv:1705.07706), with and without its "
        "{-1, 0, 1} discretisation, and optionally of a fine-tuned bundle, on one split of a data set.",
    )
    p.add_argument("--data", default="fashion-mnist",
                   help="image folder, CSV/Parquet manifest, HF dataset dir or fashion-mnist (default)")
    p.add_argument("--backbone", default=None, help=_DEFAULT_BACKBONE_HELP)
    p.add_argument("--weights", default="imagenet", help="imagenet (installed), a local state dict, or none")
    p.add_argument("--image-size", type=int_at_least(1), default=None,
                   help="input size override, e.g. 64 for 28 px images")
    p.add_argument("--limit-per-class", type=int_at_least(0), default=200,
                   help="at most N images per class and split (default %(default)s; 0 = all)")
    p.add_argument("--split", default=None, choices=["train", "val", "test"],
                   help="split to evaluate (default: test, else val, else train)")
    p.add_argument("--mode", default="all_vs_all", choices=["all_vs_all", "holdout"],
                   help="query/gallery protocol (default %(default)s)")
    p.add_argument("--reference", default="auto", choices=["auto", "train", "eval"],
                   help="images for the FNE statistics: the train split (auto, when it is not the evaluated "
                        "split) or the evaluated images")
    p.add_argument("--thresholds", type=float, nargs=2, default=None, metavar=("T_NEG", "T_POS"),
                   help="FNE discretisation thresholds (default -0.25 0.15)")
    p.add_argument("--bundle", default=None, help="a fine-tuned model bundle to add as a row")
    p.add_argument("--out", default="layers-report", type=out_dir, help="folder for layers.csv and layers.png")
    p.add_argument("--save-fne", default=None, type=out_dir, metavar="DIR",
                   help="also export the fitted full-network embedding as a model bundle")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save-fne bundle")
    p.add_argument("--batch-size", type=int_at_least(1), default=64)
    p.add_argument("--num-workers", type=workers, default="auto",
                   help="image decoding workers, or auto: $DEEPFEAT_NUM_WORKERS, else the runtime's default")
    p.add_argument("--device", type=device, default="auto", help="auto (cuda when available), cpu, cuda, cuda:N, mps")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the holdout query choice")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)
