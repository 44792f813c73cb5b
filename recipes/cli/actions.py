"""``deepfeat dedup | classify | cluster``: a recipe's action on a collection that is already filled.

The handlers connect, call the action's library function and print what it returned.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from deepfeat.finetune.errors import DataError
from deepfeat.recipes.cli.arguments import int_at_least, out_dir, out_file
from deepfeat.recipes.cli.connection import add_connection_args, connect_from_args

__all__ = ["add_cli"]


def _threshold(text: str) -> str | float:
    """``--threshold``: ``auto`` (calibrated on the data) or a number."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number such as 0.95, got {text!r}") from None


def _cmd_dedup(args: argparse.Namespace) -> int:
    from deepfeat.recipes.dedup import calibrate_threshold, find_duplicates, write_duplicates_csv

    if args.threshold == "auto" and not args.bundle:
        raise DataError("--threshold auto calibrates on copies of the collection's own images (JPEG re-encode, "
                        "resize, brightness) and needs the bundle that filled it: give --bundle DIR, or a fixed "
                        "--threshold such as 0.95")
    with connect_from_args(args) as conn:
        threshold = args.threshold
        if threshold == "auto":
            from deepfeat.finetune.models.bundle import ModelBundle

            calibration = calibrate_threshold(conn, args.collection, ModelBundle.load(args.bundle),
                                              n_images=args.calibration_images, filter=args.filter)
            print(calibration.summary(), flush=True)
            threshold = calibration.threshold
        report = find_duplicates(conn, args.collection, threshold=float(threshold),
                                 max_neighbours=args.max_neighbours, filter=args.filter)
    path = write_duplicates_csv(report, args.out)
    print(f"{len(report.groups)} near-duplicate group(s), {report.n_duplicates} removable of {report.n_records} "
          f"records at threshold {report.threshold:.4f} ({report.metric}); groups written to {path}")
    for number, members in enumerate(report.groups[:10]):
        print(f"  group {number}: {', '.join(members[:6])}{' ...' if len(members) > 6 else ''}")
    return 0


def _cmd_classify(args: argparse.Namespace) -> int:
    from deepfeat.recipes.classify import classify_images, knn_accuracy, write_predictions_csv
    from deepfeat.recipes.recipes import list_images

    if not args.data and not args.labelled_split:
        raise DataError("give images to label with --data PATH, and/or a labelled split to score with "
                        "--labelled-split SPLIT")
    if args.data and not args.bundle:
        raise DataError("labelling images needs the model bundle that filled the collection: --bundle DIR")
    with connect_from_args(args) as conn:
        if args.labelled_split:
            report = knn_accuracy(conn, args.collection, split=args.labelled_split, k=args.k, weighting=args.weighting)
            print(f"kNN accuracy (k={report.k}) on split {report.split!r}: {report.accuracy:.4f} over {report.n} "
                  f"records (chance {report.chance:.4f}, majority class {report.majority:.4f})")
        if args.data:
            images = list_images(args.data)
            predictions = classify_images(conn, args.collection, args.bundle, images, k=args.k,
                                          weighting=args.weighting)
            path = write_predictions_csv(predictions, images, args.out)
            print(f"labelled {len(images)} image(s); predictions written to {path}")
            for image, p in list(zip(images, predictions, strict=True))[:10]:
                print(f"  {Path(image).name}: {p.label} ({p.confidence:.2f})")
    return 0


def _cmd_cluster(args: argparse.Namespace) -> int:
    from deepfeat.recipes.cluster import cluster_collection, write_clusters

    with connect_from_args(args) as conn:
        result = cluster_collection(conn, args.collection, args.k, seed=args.seed, filter=args.filter)
    files = write_clusters(result, args.out, per_cluster=args.per_cluster)
    scores = f", purity {result.purity:.3f}, ARI {result.ari:.3f}" if result.purity is not None else ""
    print(f"{result.k} clusters of {len(result.assignments)} records, sizes {result.sizes}{scores}")
    print(f"assignments: {files['csv']}\npicture:     {files['picture']}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``dedup``, ``classify`` and ``cluster``."""
    p = sub.add_parser("dedup", help="near-duplicate groups of a collection by range search, as CSV")
    add_connection_args(p, collection=True)
    p.add_argument("--threshold", type=_threshold, default="auto",
                   help="auto (default): calibrated on copies of sampled images of the collection (JPEG re-encode, "
                        "half size, brightness), between their scores and those of distinct images; or a cosine "
                        "similarity above which images are duplicates (an L2 distance for L2 collections). Suits "
                        "instance-level features (the off-the-shelf backbone), not a space fine-tuned to classes")
    p.add_argument("--bundle", default=None, help="the bundle that filled the collection (for --threshold auto)")
    p.add_argument("--calibration-images", type=int_at_least(2), default=48,
                   help="images sampled for --threshold auto (default 48)")
    p.add_argument("--max-neighbours", type=int_at_least(1), default=32, help="most duplicates fetched per image")
    p.add_argument("--filter", default=None, help="only rows matching this Milvus expression")
    p.add_argument("--out", default="duplicates.csv", type=out_file, help="CSV to write (default duplicates.csv)")
    p.set_defaults(handler=_cmd_dedup)

    p = sub.add_parser("classify", help="kNN labels for images from a labelled collection; accuracy on a split")
    add_connection_args(p, collection=True)
    p.add_argument("--bundle", default=None, help="the model bundle that filled the collection (to embed --data)")
    p.add_argument("--data", default=None, help="unlabelled images: a file, a folder or a manifest")
    p.add_argument("--labelled-split", default=None, metavar="SPLIT",
                   help="report the kNN accuracy on this split of the collection (neighbours from the others)")
    p.add_argument("--k", type=int_at_least(1), default=10, help="neighbours that vote (default 10)")
    p.add_argument("--weighting", choices=["similarity", "uniform"], default="similarity")
    p.add_argument("--out", default="predictions.csv", type=out_file,
                   help="CSV of predictions for --data (default predictions.csv)")
    p.set_defaults(handler=_cmd_classify)

    p = sub.add_parser("cluster", help="k-means on a collection's embeddings: assignments CSV and a picture")
    add_connection_args(p, collection=True)
    p.add_argument("--k", type=int_at_least(1), required=True, help="number of clusters")
    p.add_argument("--filter", default=None, help="only rows matching this Milvus expression")
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--per-cluster", type=int_at_least(1), default=8, help="images per cluster in the picture")
    p.add_argument("--out", default="clusters", type=out_dir, help="output folder (clusters.csv, clusters.png)")
    p.set_defaults(handler=_cmd_cluster)
