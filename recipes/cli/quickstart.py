"""``deepfeat quickstart``: off-the-shelf vs fine-tuned on Fashion-MNIST (or a class folder), Milvus Lite, a picture.

The run is :func:`deepfeat.recipes.quickstart.run_quickstart`; this module turns the options into
:class:`~deepfeat.recipes.quickstart.QuickstartOptions` and prints the result.
"""

from __future__ import annotations

import argparse
from typing import Any

from deepfeat.recipes.cli.arguments import int_at_least, launched_rank, out_dir, positive_float
from deepfeat.recipes.cli.recipe import SET_HELP, print_skipped, print_test

__all__ = ["add_cli"]


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from deepfeat.recipes.quickstart import QuickstartOptions, run_quickstart  # imports torch and Milvus

    kw: dict[str, Any] = {"data": args.data, "out": args.out, "progress": not args.quiet, "seed": args.seed,
                          "num_workers": args.num_workers}
    if args.minutes is not None:
        kw["minutes"] = args.minutes
    opts = QuickstartOptions.full(**kw) if args.full else QuickstartOptions(**kw)
    if args.tiny:
        opts.train_per_class, opts.test_per_class, opts.image_size = 24, 12, 32
        opts.max_epochs, opts.batches_per_epoch, opts.num_workers = 2, 4, 0
    opts.extra = list(args.set or [])
    if not launched_rank():  # a DDP rank > 0 re-runs this command: rank 0 says it once
        print(f"deepfeat quickstart: data={opts.data or 'fashion-mnist'} out={opts.out} "
              f"(training budget {opts.minutes:g} min; --full for a longer run)")
    res = run_quickstart(opts)
    if res.rank:  # a DDP rank > 0: rank 0 reports
        return 0
    print(f"\n{res.guard_message}")
    print_test(res.table, res.test_message)
    print(f"bundle:     {res.bundle}")
    print(f"milvus:     {res.milvus_uri} collection {res.collection!r} ({res.n_loaded} vectors)")
    print_skipped(res.n_skipped, res.skipped_report, width=12)
    print(f"picture:    {res.picture}")
    print("time (s):   " + ", ".join(f"{k} {v:.0f}" for k, v in res.seconds.items()))
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``deepfeat quickstart``."""
    p = sub.add_parser("quickstart", help="off-the-shelf vs fine-tuned, load into Milvus Lite, search, picture")
    p.add_argument("--data", default=None, help="an image folder (one sub-folder per class); default Fashion-MNIST")
    p.add_argument("--out", default="deepfeat-quickstart", type=out_dir,
                   help="output folder (bundle, Milvus Lite db, picture)")
    p.add_argument("--minutes", type=positive_float, default=None, help="training budget in minutes")
    p.add_argument("--full", action="store_true", help="all of Fashion-MNIST at 64 px, 20 minutes of training")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests)")
    p.add_argument("--num-workers", type=int_at_least(0), default=2)
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--set", nargs="+", action="extend", default=None, metavar="KEY=VALUE",
                   help=f"{SET_HELP} trainer.strategy=ddp trainer.devices=2 (applied after the options above)")
    p.set_defaults(handler=_cmd_quickstart, trains=True, uses_milvus=True)
