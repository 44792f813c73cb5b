"""The ``deepfeat`` command.

``fit|validate|test|predict`` go to LightningCLI (``--config recipe.yaml``, ``--print_config``); the
other subcommands are plain argparse, registered by the module that owns them through
``add_cli(subparsers)``. A :class:`DeepfeatError` is printed as one line (exit code 2), never a stack
trace; ``--debug`` shows the trace.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import pickle
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from deepfeat.finetune.errors import DeepfeatError

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# Modules that register subcommands with add_cli(subparsers); each owns its own commands.
COMMAND_MODULES = (
    "deepfeat.recipes.cli",
    "deepfeat.connectors.cli",
    "deepfeat.recipes.quickstart",
    "deepfeat.recipes.commands",
    "deepfeat.recipes.layers",
    "deepfeat.recipes.serve",
)

Handler = Callable[[argparse.Namespace], int]


# Commands that train: Lightning sets its own loggers to INFO (with a handler) when it is imported, so
# quieting it means importing it first.
TRAINING_COMMANDS = ("quickstart", "recipe", *LIGHTNING_COMMANDS)


def _setup_logging(verbose: int, command: str | None = None) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose < 2:
        if command in TRAINING_COMMANDS:
            import lightning.pytorch  # noqa: F401
        for noisy in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
            logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


# ----------------------------------------------------------------------------------------------------
# finetune commands: export, evaluate, embed
# ----------------------------------------------------------------------------------------------------
def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise DeepfeatError(f"config file {path!r} not found; list the shipped recipes with 'deepfeat recipe list'")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise DeepfeatError(f"config {path!r} is not a YAML mapping")
    return data


def _module_from_checkpoint(ckpt: str) -> Any:
    """Rebuild a MetricLearningModule from a checkpoint's hyper-parameters and weights (weights_only)."""
    import inspect

    import torch

    from deepfeat.finetune.errors import ModelError
    from deepfeat.finetune.training.callbacks import load_module_weights
    from deepfeat.finetune.training.module import MetricLearningModule

    if not Path(ckpt).is_file():
        raise ModelError(f"checkpoint {ckpt!r} not found; pass the .ckpt written by 'deepfeat fit'")
    try:
        meta = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"cannot load {ckpt!r} safely ({type(exc).__name__}); deepfeat loads checkpoints with "
                         f"weights_only=True and refuses pickled objects") from exc
    accepted = set(inspect.signature(MetricLearningModule.__init__).parameters) - {"self", "loss", "miner"}
    hp = {k: v for k, v in dict(meta.get("hyper_parameters", {})).items() if k in accepted}
    hp["weights"] = "none"  # the checkpoint carries the weights
    module = MetricLearningModule(**hp)
    load_module_weights(module, ckpt)
    return module


def _cmd_export(args: argparse.Namespace) -> int:
    from deepfeat.finetune.models.bundle import export_bundle

    module = _module_from_checkpoint(args.ckpt)
    path = export_bundle(module.model, args.out, name=args.name, onnx=not args.no_onnx, overwrite=args.overwrite,
                         training={"checkpoint": str(args.ckpt)})
    print(f"bundle written to {path}")
    return 0


def _workers(text: str) -> int | str:
    """``--num-workers``: a count, or ``auto``."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of workers or 'auto', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"the number of workers cannot be negative, got {value}")
    return value


def _cmd_embed(args: argparse.Namespace) -> int:
    import torch

    from deepfeat.finetune.data.readers import read_records
    from deepfeat.finetune.errors import DataError
    from deepfeat.finetune.inference.embed import PRECISION_AUTOCAST, auto_num_workers, embed_to_parquet
    from deepfeat.finetune.models.bundle import ModelBundle

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {args.device}: no CUDA device is available here (torch.cuda.is_available() "
                        f"is False); use --device cpu")
    bundle = ModelBundle.load(args.bundle, device=device)
    num_workers = auto_num_workers(device) if args.num_workers == "auto" else args.num_workers
    # skip: a missing file or broken link is one reported skip, not a refusal of the whole source
    records = read_records(args.data, check_files=args.on_error == "fail",
                           **({"root": args.root} if args.root else {}))
    if args.limit:
        records = records.head(args.limit)
    result = embed_to_parquet(bundle, records, args.out, shard_size=args.shard_size, batch_size=args.batch_size,
                              num_workers=num_workers, on_error=args.on_error, progress=not args.quiet,
                              compile=args.compile, autocast=PRECISION_AUTOCAST[args.precision],
                              decode=args.decode)
    print(f"embedded {result.n_embedded} images ({result.n_skipped} skipped, report {result.out_dir}/_report.json) "
          f"into {len(result.shards)} shards in {result.out_dir} at {result.images_per_second:.1f} img/s")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from deepfeat.finetune.inference.evaluate import evaluate_models, off_the_shelf
    from deepfeat.finetune.metrics import format_metrics_table
    from deepfeat.finetune.models.bundle import ModelBundle
    from deepfeat.finetune.training.datamodule import RetrievalDataModule

    cfg = _load_yaml(args.config)
    data_cfg = dict(cfg.get("data", {}))
    data_cfg.pop("class_path", None)
    data_cfg = dict(data_cfg.get("init_args", data_cfg))
    if args.data:
        data_cfg["source"] = args.data
    if args.split_mode:
        data_cfg["split_mode"] = args.split_mode
    if args.limit_per_class is not None:
        data_cfg["limit_per_class"] = args.limit_per_class or None
    dm = RetrievalDataModule(**data_cfg)
    models: dict[str, Any] = {}
    bundle = ModelBundle.load(args.bundle) if args.bundle else None
    fine = bundle.model if bundle else _module_from_checkpoint(args.ckpt).model if args.ckpt else None
    if fine is None:
        raise DeepfeatError("give the fine-tuned model with --bundle DIR or --ckpt FILE")
    models["off-the-shelf"] = off_the_shelf(fine, args.baseline_weights)
    models["fine-tuned"] = fine
    records = dm.split_records(args.split)
    results = evaluate_models(models, records, batch_size=args.batch_size, num_workers=args.num_workers)
    print(format_metrics_table(results, delta=True))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the finetune commands (export, embed, evaluate)."""
    p = sub.add_parser("export", help="export a training checkpoint as a model bundle")
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint written by 'deepfeat fit'")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--name", default=None)
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=_cmd_export)

    p = sub.add_parser("embed", help="embed images with a bundle into Parquet shards")
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", required=True, help="image folder, CSV/Parquet manifest, HF dataset dir or fashion-mnist")
    p.add_argument("--out", required=True, help="output directory for part-NNNNN.parquet shards")
    p.add_argument("--root", default=None,
                   help="folder that relative manifest paths are read from; no path may leave it")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=_workers, default="auto",
                   help="DataLoader worker processes, or auto: up to 8 on a GPU; on a CPU none on 2 cores "
                        "(the model uses them all), a few on more")
    p.add_argument("--shard-size", type=int, default=50_000)
    p.add_argument("--on-error", choices=["skip", "fail"], default="skip")
    p.add_argument("--limit", type=int, default=None, help="embed only the first N records")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on CUDA, float32 on CPU; bf16 on a CPU with AVX512-BF16/AMX is "
                        "2-4x faster (vectors within 1e-3 cosine of float32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (pays off from a few "
                                                          "thousand images: compiling takes a minute)")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one, else the CPU), cpu, "
                                                      "cuda or cuda:N")
    p.add_argument("--decode", choices=["auto", "cpu", "device"], default="auto",
                   help="where JPEGs are decoded and resized: cpu (the workers), device (nvJPEG on the GPU, "
                        "the workers only read bytes); auto: device on CUDA, cpu elsewhere")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_embed)

    p = sub.add_parser("evaluate", help="off-the-shelf vs fine-tuned retrieval metrics, side by side")
    p.add_argument("--config", required=True, help="the recipe YAML used for training (its data section)")
    p.add_argument("--bundle", default=None)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--data", default=None, help="evaluate on this source instead of the config's data.source")
    p.add_argument("--split-mode", default=None, choices=["as_is", "by_class", "by_group"])
    p.add_argument("--limit-per-class", type=int, default=None, help="0 for no limit")
    p.add_argument("--baseline-weights", default="imagenet",
                   help="weights of the off-the-shelf row: imagenet (installed package), a local file, or none")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.set_defaults(handler=_cmd_evaluate)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every non-Lightning subcommand."""
    parser = argparse.ArgumentParser(prog="deepfeat", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug logging")
    parser.add_argument("--debug", action="store_true", help="show full stack traces")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, help=f"LightningCLI {name} (--config recipe.yaml; --help for all options)",
                       add_help=False)
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        module.add_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deepfeat`` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list
    verbose = sum(a.count("v") for a in args_list if a.startswith("-v") and set(a[1:]) == {"v"})
    verbose += args_list.count("--verbose")
    if args_list and args_list[0] in LIGHTNING_COMMANDS:
        _setup_logging(max(verbose, 1), args_list[0])
        try:
            from deepfeat.finetune.training.config import run_lightning_cli

            run_lightning_cli(args_list)
        except DeepfeatError as exc:
            if debug:
                raise
            print(f"deepfeat: error: {exc}", file=sys.stderr)
            return 2
        except pickle.UnpicklingError as exc:  # --ckpt_path: Lightning loads with torch's weights_only=True
            if debug:
                raise
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            what = f"a pickled {found.group(1)!r}" if found else "pickled Python objects"
            print(f"deepfeat: error: refused to load the checkpoint: it holds {what}, and deepfeat loads "
                  f"checkpoints with weights_only=True (no code runs from a file); resume only from a checkpoint "
                  f"written by 'deepfeat fit'", file=sys.stderr)
            return 2
        return 0
    parser = build_parser()
    args = parser.parse_args(args_list)
    _setup_logging(args.verbose, args.command)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 1
    try:
        return handler(args)
    except DeepfeatError as exc:
        if args.debug:
            raise
        print(f"deepfeat: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deepfeat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
