"""``deepfeat recipe list | show | run``: the shipped workflows (fashion, medical, dedup, classify, cluster, ...).

``recipe list`` reads the YAMLs only (no torch, no Lightning: it answers at once); ``show`` and ``run`` build
the recipe's objects with the LightningCLI parser, which refuses an unknown key with its reason.
"""

from __future__ import annotations

import argparse
from typing import Any

from deepfeat.finetune.redaction import mask_uri
from deepfeat.recipes.cli.arguments import launched_rank, out_dir, positive_float
from deepfeat.recipes.config import list_recipes

__all__ = ["SET_HELP", "add_cli", "print_skipped", "print_test"]

#: The help of every command's ``--set``.
SET_HELP = "override YAML keys; repeat --set or give several: model.image_size=32 trainer.max_epochs=2"


def _cmd_recipe_list(args: argparse.Namespace) -> int:
    recipes = list_recipes()
    width = max((len(r.name) for r in recipes), default=0)
    for r in recipes:
        print(f"{r.name.ljust(width)}  {r.description}")
    folder = recipes[0].path.parent if recipes else "?"
    print(f"\nrun one with: deepfeat recipe run NAME --data PATH   (YAMLs in {folder})")
    return 0


def _cmd_recipe_show(args: argparse.Namespace) -> int:
    import yaml

    from deepfeat.recipes.config import load_recipe  # builds the objects: imports Lightning

    overrides = args.set or []
    config = load_recipe(args.name, overrides)
    print(f"# {config.path}" + (f" with {' '.join(overrides)}" if overrides else ""))
    print(yaml.safe_dump(config.raw, sort_keys=False), end="")
    return 0


def print_test(table: str | None, message: str) -> None:
    """The before/after table on the held-out test split and its one-line summary (or why there is none)."""
    if table:
        print("held-out test split (no part in training or model selection), before/after:")
        print(table)
    print(message)


def _plain(value: Any) -> Any:
    """Floats at 4 significant digits (``0.475``, not ``0.47500000000000003``), inside lists and dicts too."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _print_summary(summary: dict[str, Any]) -> None:
    skip = {"searches", "shop_the_look", "cases", "groups", "external", "unlabelled", "files"}
    for key, value in summary.items():
        if key not in skip:
            print(f"  {key}: {_plain(value)}")
    for key, value in (summary.get("files") or {}).items():
        if value:
            print(f"  file {key}: {value}")


def print_skipped(n_skipped: int, report: str | None, *, width: int) -> None:
    """The line for the images that did not decode (none: no line)."""
    if n_skipped:
        print(f"{'skipped:'.ljust(width)}{n_skipped} image(s) that do not decode, not loaded; listed in {report}")


def _cmd_recipe_run(args: argparse.Namespace) -> int:
    from deepfeat.recipes.engine import run_recipe
    from deepfeat.recipes.recipes import list_images

    queries = [p for q in args.query or [] for p in list_images(q)]
    out = args.out or f"deepfeat-{args.name}"
    if not launched_rank():  # a DDP rank > 0 re-runs this command: rank 0 says it once
        print(f"deepfeat recipe {args.name}: data={args.data or '(from the recipe)'} out={out}")
    res = run_recipe(args.name, args.data, out=args.out, uri=args.uri, overrides=args.set or (),
                     minutes=args.minutes, queries=queries, replace=True if args.replace else None,
                     progress=not args.quiet)
    if res.rank:  # a DDP rank > 0 (Lightning re-ran this command in it): rank 0 reports
        return 0
    print(res.guard_message)
    print_test(res.test_table, res.test_message)
    print(f"bundle:   {res.bundle}")
    print(f"milvus:   {mask_uri(res.uri)} collection {res.collection!r} ({res.n_loaded} of {res.n_records} records)")
    print_skipped(res.n_skipped, res.skipped_report, width=10)
    print(f"{res.name}:")
    _print_summary(res.summary)
    print(f"report:   {res.out / 'recipe.json'}")
    print("time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in res.seconds.items()))
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``recipe`` with its actions ``list``, ``show`` and ``run``."""
    recipe = sub.add_parser("recipe", help="complete workflows: fashion, medical, dedup, classify, cluster")
    actions = recipe.add_subparsers(dest="recipe_command", metavar="ACTION")
    p = actions.add_parser("list", help="the shipped recipes with a one-line description")
    p.set_defaults(handler=_cmd_recipe_list)
    p = actions.add_parser("show", help="print a recipe's YAML (with --set overrides applied)")
    p.add_argument("name", help="recipe name or path of a recipe .yaml")
    p.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE", help=SET_HELP)
    p.set_defaults(handler=_cmd_recipe_show, trains=True)
    p = actions.add_parser("run", help="read, fine-tune (guarded), embed, load into Milvus, run the recipe's action")
    p.add_argument("name", help="recipe name ('deepfeat recipe list') or path of a recipe .yaml")
    p.add_argument("--data", default=None, help="folder or CSV/Parquet manifest (default: the recipe's data.source)")
    p.add_argument("--out", default=None, type=out_dir, help="output folder (default deepfeat-NAME)")
    p.add_argument("--uri", default=None, help="Milvus URI (default: OUT/milvus.db, a Milvus Lite database)")
    p.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE",
                   help=f"{SET_HELP} recipe.search.top_k=10")
    p.add_argument("--minutes", type=positive_float, default=None, help="training budget in minutes")
    p.add_argument("--query", nargs="+", action="extend", default=None, metavar="PATH",
                   help="images for the action: fashion shop-the-look photos, medical query scans, classify "
                        "unlabelled images (files, folders or manifests)")
    p.add_argument("--replace", action="store_true", help="drop an existing collection of the same name at --uri first")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_cmd_recipe_run, trains=True, uses_milvus=True)

    def _recipe_help(args: argparse.Namespace) -> int:
        recipe.print_help()
        return 1

    recipe.set_defaults(handler=_recipe_help)
