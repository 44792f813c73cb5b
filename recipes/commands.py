"""``deepfeat recipe list|show|run`` and the recipe actions on an existing collection: ``dedup``, ``classify``,
``cluster``.

Only these handlers print; the library functions they call return values and log.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from deepfeat.finetune.errors import DataError


def _cmd_recipe_list(args: argparse.Namespace) -> int:
    from deepfeat.recipes.recipes import list_recipes

    recipes = list_recipes()
    width = max((len(r.name) for r in recipes), default=0)
    for r in recipes:
        print(f"{r.name.ljust(width)}  {r.description}")
    folder = recipes[0].path.parent if recipes else "?"
    print(f"\nrun one with: deepfeat recipe run NAME --data PATH   (YAMLs in {folder})")
    return 0


def _cmd_recipe_show(args: argparse.Namespace) -> int:
    import yaml

    from deepfeat.recipes.recipes import load_recipe

    config = load_recipe(args.name, args.set or ())
    print(f"# {config.path}" + (f" with {' '.join(args.set)}" if args.set else ""))
    print(yaml.safe_dump(config.raw, sort_keys=False), end="")
    return 0


def _print_summary(summary: dict[str, Any]) -> None:
    skip = {"searches", "shop_the_look", "cases", "groups", "external", "unlabelled", "files"}
    for key, value in summary.items():
        if key not in skip:
            print(f"  {key}: {value}")
    for key, value in (summary.get("files") or {}).items():
        if value:
            print(f"  file {key}: {value}")


def _cmd_recipe_run(args: argparse.Namespace) -> int:
    from deepfeat.recipes.recipes import list_images, run_recipe

    queries = [p for q in args.query or [] for p in list_images(q)]
    out = args.out or f"deepfeat-{args.name}"
    print(f"deepfeat recipe {args.name}: data={args.data or '(from the recipe)'} out={out}")
    res = run_recipe(
        args.name,
        args.data,
        out=args.out,
        uri=args.uri,
        overrides=args.set or (),
        minutes=args.minutes,
        queries=queries,
        replace=True if args.replace else None,
        progress=not args.quiet,
    )
    print(res.guard_message)
    print(f"bundle:   {res.bundle}")
    print(f"milvus:   {res.uri} collection {res.collection!r} ({res.n_loaded} of {res.n_records} records)")
    print(f"{res.name}:")
    _print_summary(res.summary)
    print(f"report:   {res.out / 'recipe.json'}")
    print("time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in res.seconds.items()))
    return 0


def _connection(args: argparse.Namespace) -> Any:
    from deepfeat.connectors.cli import _connect

    return _connect(args)


def _cmd_dedup(args: argparse.Namespace) -> int:
    from deepfeat.recipes.dedup import find_duplicates, write_duplicates_csv

    with _connection(args) as conn:
        report = find_duplicates(
            conn, args.collection, threshold=args.threshold, max_neighbours=args.max_neighbours, filter=args.filter
        )
    path = write_duplicates_csv(report, args.out)
    print(
        f"{len(report.groups)} near-duplicate group(s), {report.n_duplicates} removable of {report.n_records} "
        f"records at threshold {report.threshold} ({report.metric}); groups written to {path}"
    )
    for number, members in enumerate(report.groups[:10]):
        print(f"  group {number}: {', '.join(members[:6])}{' ...' if len(members) > 6 else ''}")
    return 0


def _cmd_classify(args: argparse.Namespace) -> int:
    from deepfeat.recipes.classify import classify_images, knn_accuracy, write_predictions_csv
    from deepfeat.recipes.recipes import list_images

    if not args.data and not args.labelled_split:
        raise DataError(
            "give images to label with --data PATH, and/or a labelled split to score with --labelled-split SPLIT"
        )
    with _connection(args) as conn:
        if args.labelled_split:
            report = knn_accuracy(conn, args.collection, split=args.labelled_split, k=args.k, weighting=args.weighting)
            print(
                f"kNN accuracy (k={report.k}) on split {report.split!r}: {report.accuracy:.4f} over {report.n} "
                f"records (chance {report.chance:.4f}, majority class {report.majority:.4f})"
            )
        if args.data:
            if not args.bundle:
                raise DataError("labelling images needs the model bundle that filled the collection: --bundle DIR")
            images = list_images(args.data)
            predictions = classify_images(
                conn, args.collection, args.bundle, images, k=args.k, weighting=args.weighting
            )
            path = write_predictions_csv(predictions, images, args.out)
            print(f"labelled {len(images)} image(s); predictions written to {path}")
            for image, p in list(zip(images, predictions, strict=True))[:10]:
                print(f"  {Path(image).name}: {p.label} ({p.confidence:.2f})")
    return 0


def _cmd_cluster(args: argparse.Namespace) -> int:
    from deepfeat.recipes.cluster import cluster_collection, write_clusters

    with _connection(args) as conn:
        result = cluster_collection(conn, args.collection, args.k, seed=args.seed, filter=args.filter)
    files = write_clusters(result, args.out, per_cluster=args.per_cluster)
    scores = f", purity {result.purity:.3f}, ARI {result.ari:.3f}" if result.purity is not None else ""
    print(f"{result.k} clusters of {len(result.assignments)} records, sizes {result.sizes}{scores}")
    print(f"assignments: {files['csv']}\npicture:     {files['picture']}")
    return 0


def _add_connection(p: argparse.ArgumentParser) -> None:
    from deepfeat.connectors.cli import _add_connection as add

    add(p)
    p.add_argument("--collection", required=True, help="the collection (or alias) to work on")


def add_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``recipe``, ``dedup``, ``classify`` and ``cluster``."""
    recipe = sub.add_parser("recipe", help="complete workflows: fashion, medical, dedup, classify, cluster")
    actions = recipe.add_subparsers(dest="recipe_command", metavar="ACTION")
    p = actions.add_parser("list", help="the shipped recipes with a one-line description")
    p.set_defaults(handler=_cmd_recipe_list)
    p = actions.add_parser("show", help="print a recipe's YAML (with --set overrides applied)")
    p.add_argument("name", help="recipe name or path of a recipe .yaml")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="override YAML keys, e.g. model.image_size=32")
    p.set_defaults(handler=_cmd_recipe_show)
    p = actions.add_parser("run", help="read, fine-tune (guarded), embed, load into Milvus, run the recipe's action")
    p.add_argument("name", help="recipe name ('deepfeat recipe list') or path of a recipe .yaml")
    p.add_argument("--data", default=None, help="folder or CSV/Parquet manifest (default: the recipe's data.source)")
    p.add_argument("--out", default=None, help="output folder (default deepfeat-NAME)")
    p.add_argument("--uri", default=None, help="Milvus URI (default: OUT/milvus.db, a Milvus Lite database)")
    p.add_argument(
        "--set",
        nargs="+",
        metavar="KEY=VALUE",
        help="override YAML keys: model.image_size=32 trainer.max_epochs=2 recipe.search.top_k=10",
    )
    p.add_argument("--minutes", type=float, default=None, help="training budget in minutes")
    p.add_argument(
        "--query",
        nargs="+",
        default=None,
        metavar="PATH",
        help="images for the action: fashion shop-the-look photos, medical query scans, classify "
        "unlabelled images (files, folders or manifests)",
    )
    p.add_argument("--replace", action="store_true", help="drop an existing collection of the same name at --uri first")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_cmd_recipe_run)

    def _recipe_help(args: argparse.Namespace) -> int:
        recipe.print_help()
        return 1

    recipe.set_defaults(handler=_recipe_help)

    p = sub.add_parser("dedup", help="near-duplicate groups of a collection by range search, as CSV")
    _add_connection(p)
    p.add_argument(
        "--threshold",
        type=float,
        default=0.95,
        help="cosine similarity above which images are duplicates (an L2 distance for L2 collections)",
    )
    p.add_argument("--max-neighbours", type=int, default=32, help="most duplicates fetched per image")
    p.add_argument("--filter", default=None, help="only rows matching this Milvus expression")
    p.add_argument("--out", default="duplicates.csv", help="CSV to write (default duplicates.csv)")
    p.set_defaults(handler=_cmd_dedup)

    p = sub.add_parser("classify", help="kNN labels for images from a labelled collection; accuracy on a split")
    _add_connection(p)
    p.add_argument("--bundle", default=None, help="the model bundle that filled the collection (to embed --data)")
    p.add_argument("--data", default=None, help="unlabelled images: a file, a folder or a manifest")
    p.add_argument(
        "--labelled-split",
        default=None,
        metavar="SPLIT",
        help="report the kNN accuracy on this split of the collection (neighbours from the others)",
    )
    p.add_argument("--k", type=int, default=10, help="neighbours that vote (default 10)")
    p.add_argument("--weighting", choices=["similarity", "uniform"], default="similarity")
    p.add_argument("--out", default="predictions.csv", help="CSV of predictions for --data (default predictions.csv)")
    p.set_defaults(handler=_cmd_classify)

    p = sub.add_parser("cluster", help="k-means on a collection's embeddings: assignments CSV and a picture")
    _add_connection(p)
    p.add_argument("--k", type=int, required=True, help="number of clusters")
    p.add_argument("--filter", default=None, help="only rows matching this Milvus expression")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-cluster", type=int, default=8, help="images per cluster in the picture")
    p.add_argument("--out", default="clusters", help="output folder (clusters.csv, clusters.png)")
    p.set_defaults(handler=_cmd_cluster)
