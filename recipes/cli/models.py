"""``deepfeat export | embed | evaluate``: a checkpoint to a bundle, images to shards, off-the-shelf vs fine-tuned.

The handlers import torch and the model code when they run, not when the parser is built (``deepfeat --help``
stays fast).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
from pathlib import Path
from typing import Any

from deepfeat.finetune.errors import DataError, DeepfeatError, ModelError
from deepfeat.recipes.cli.arguments import device, int_at_least, out_dir, out_file, resolve_device, workers
from deepfeat.recipes.config import check_config, read_yaml, resolve_config

__all__ = ["add_cli"]


def _module_from_checkpoint(ckpt: str) -> Any:
    """Rebuild a MetricLearningModule from a checkpoint's hyper-parameters and weights (weights_only)."""
    import torch

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


def _cmd_embed(args: argparse.Namespace) -> int:
    from deepfeat.finetune.data.readers import read_records
    from deepfeat.finetune.inference.embed import embed_to_parquet
    from deepfeat.finetune.inference.runtime import resolve_num_workers
    from deepfeat.finetune.models.bundle import ModelBundle

    if args.engine == "local":
        for flag, value in (("--address", args.address), ("--concurrency", args.concurrency),
                            ("--threads", args.threads)):
            if value is not None:
                raise DataError(f"{flag} {value!r} is for --engine ray; add --engine ray to embed on a Ray cluster, "
                                f"or leave {flag} out")
    # on Ray the bundle is loaded on the CPU here and moved to each actor's device there
    dev = "cpu" if args.engine == "ray" else resolve_device(args.device)
    # --num-workers auto: $DEEPFEAT_NUM_WORKERS, else the device's default; checked before any work
    num_workers = resolve_num_workers(args.num_workers, device=dev) if args.engine == "local" else 0
    bundle = ModelBundle.load(args.bundle, device=dev)
    # skip: a missing file or broken link is one reported skip, not a refusal of the whole source
    records = read_records(args.data, check_files=args.on_error == "fail",
                           **({"root": args.root} if args.root else {}))
    if args.limit is not None:
        records = records.head(args.limit)
    if args.engine == "ray":
        from deepfeat.finetune.inference.distributed import embed_with_ray, import_ray

        import_ray()  # Ray configures its loggers on import; without -v its INFO and notices stay out
        if not args.verbose and not args.debug:
            for name in ("ray", "ray.data"):
                logging.getLogger(name).setLevel(logging.ERROR)
        result = embed_with_ray(bundle, records, args.out, shard_size=args.shard_size, batch_size=args.batch_size,
                                on_error=args.on_error, root=args.root, address=args.address,
                                concurrency=args.concurrency, threads=args.threads, autocast=args.precision,
                                progress=not args.quiet)
    else:  # --precision auto: $DEEPFEAT_PRECISION, else bf16 on CUDA only (the runtime rule, in embed_to_parquet)
        result = embed_to_parquet(bundle, records, args.out, shard_size=args.shard_size, batch_size=args.batch_size,
                                  num_workers=num_workers, on_error=args.on_error, progress=not args.quiet,
                                  device=dev, compile=args.compile, autocast=args.precision, decode=args.decode)
    print(f"embedded {result.n_embedded} images ({result.n_skipped} skipped, report {result.out_dir}/_report.json) "
          f"into {len(result.shards)} shards in {result.out_dir} at {result.images_per_second:.1f} img/s")
    return 0


def _data_section(config: str) -> dict[str, Any]:
    """The ``data:`` init arguments of a recipe YAML (a path or a shipped recipe's name)."""
    path = resolve_config(config)
    cfg = read_yaml(path, "config")
    data = cfg.get("data") or {}
    if not isinstance(data, dict):
        raise DataError(f"the 'data:' section of {str(path)!r} is not a mapping (got {type(data).__name__})")
    return dict(data.get("init_args", {k: v for k, v in data.items() if k != "class_path"}) or {})


def _trained_on(args: argparse.Namespace, bundle: Any) -> dict[str, Any]:
    """What the model's own record says it was trained on: the bundle card's ``training``, or a checkpoint's data
    module hyper-parameters (``data_source``)."""
    if bundle is not None:
        return dict(bundle.card.training or {})
    import torch

    meta = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    source = dict(meta.get("datamodule_hyper_parameters") or {}).get("source")
    return {"data_source": source} if source else {}


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from deepfeat.finetune.inference.evaluate import (
        evaluate_models,
        evaluation_header,
        off_the_shelf,
        training_data_warning,
    )
    from deepfeat.finetune.metrics import format_metrics_table
    from deepfeat.finetune.models.bundle import ModelBundle
    from deepfeat.finetune.training.datamodule import RetrievalDataModule

    if not args.bundle and not args.ckpt:
        raise DeepfeatError("give the fine-tuned model with --bundle DIR or --ckpt FILE")
    # every key of the YAML (trainer:, model:, data:, recipe:) through the recipe parser: a typo is refused with the
    # nearest valid name instead of being ignored; nothing is built, so this costs well under a second
    check_config(args.config)
    data_cfg = _data_section(args.config)
    if args.data:
        data_cfg["source"] = args.data
    else:
        data_cfg.setdefault("source", inspect.signature(RetrievalDataModule.__init__).parameters["source"].default)
        print(f"no --data: evaluating on the config's data.source {data_cfg['source']!r} ({args.config}); pass "
              f"--data FOLDER|MANIFEST to evaluate on your own images", flush=True)
    if args.split_mode:
        data_cfg["split_mode"] = args.split_mode
    if args.limit_per_class is not None:
        data_cfg["limit_per_class"] = args.limit_per_class or None
    dm = RetrievalDataModule(**data_cfg)
    bundle = ModelBundle.load(args.bundle) if args.bundle else None
    fine = bundle.model if bundle is not None else _module_from_checkpoint(args.ckpt).model
    models = {"off-the-shelf": off_the_shelf(fine, args.baseline_weights), "fine-tuned": fine}
    records = dm.split_records(args.split)
    source = str(data_cfg["source"])
    warning = training_data_warning(_trained_on(args, bundle), source, records["label"])
    if warning:
        print(f"deepfeat: warning: {warning}", file=sys.stderr, flush=True)
    header = evaluation_header(source, args.split, records)
    print(f"evaluating {header}", flush=True)
    results = evaluate_models(models, records, batch_size=args.batch_size, num_workers=args.num_workers)
    print(header)
    print(format_metrics_table(results, delta=True))
    if args.json:
        Path(args.json).write_text(json.dumps({"data": source, "split": args.split, **results}, indent=2,
                                              default=float))
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``export``, ``embed`` and ``evaluate``."""
    p = sub.add_parser("export", help="export a training checkpoint as a model bundle")
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint written by 'deepfeat fit'")
    p.add_argument("--out", required=True, type=out_dir, help="bundle directory to write")
    p.add_argument("--name", default=None)
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=_cmd_export)

    p = sub.add_parser("embed", help="embed images with a bundle into Parquet shards")
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", required=True, help="image folder, CSV/Parquet manifest, HF dataset dir or fashion-mnist")
    p.add_argument("--out", required=True, type=out_dir, help="output directory for part-NNNNN.parquet shards")
    p.add_argument("--root", default=None,
                   help="folder that relative manifest paths are read from; no path may leave it")
    p.add_argument("--batch-size", type=int_at_least(1), default=64)
    p.add_argument("--num-workers", type=workers, default="auto",
                   help="DataLoader worker processes, or auto: $DEEPFEAT_NUM_WORKERS, else up to 8 on a GPU; on a "
                        "CPU none on 2 cores (the model uses them all), a few on more")
    p.add_argument("--shard-size", type=int_at_least(1), default=50_000)
    p.add_argument("--on-error", choices=["skip", "fail"], default="skip")
    p.add_argument("--limit", type=int_at_least(1), default=None, help="embed only the first N records")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: $DEEPFEAT_PRECISION, else bf16 autocast on CUDA, float32 on CPU; bf16 on a CPU "
                        "with AVX512-BF16/AMX is 2-4x faster (vectors within 1e-3 cosine of float32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (pays off from a few "
                                                          "thousand images: compiling takes a minute)")
    p.add_argument("--device", type=device, default="auto",
                   help="auto ($DEEPFEAT_DEVICE, else a CUDA GPU when there is one, else the CPU), cpu, cuda, "
                        "cuda:N or mps")
    p.add_argument("--decode", choices=["auto", "cpu", "device"], default="auto",
                   help="where JPEGs are decoded and resized: cpu (the workers), device (nvJPEG on the GPU, "
                        "the workers only read bytes); auto: device on CUDA, cpu elsewhere")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process and its DataLoader workers; ray: Ray Data on a cluster (CPU tasks "
                        "decode, an actor pool embeds, one bundle per actor; same shards; --device, --num-workers, "
                        '--decode and --compile are the local engine\'s), needs pip install "deepfeat[ray]"')
    p.add_argument("--address", default=None,
                   help="with --engine ray: the cluster, auto (the one started by 'ray start') or "
                        "ray://host:10001; default: start a local one")
    p.add_argument("--concurrency", type=int_at_least(1), default=None,
                   help="with --engine ray: actors embedding (default: one per GPU of the cluster, else one "
                        "single-threaded actor per CPU, each reading its own batches)")
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="with --engine ray: torch threads of each CPU actor (default: the cluster's CPUs divided "
                        "by the actors)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_embed)

    p = sub.add_parser("evaluate", help="off-the-shelf vs fine-tuned retrieval metrics, side by side")
    p.add_argument("--config", required=True,
                   help="the recipe used for training (its data section): a YAML path or a shipped recipe's name")
    p.add_argument("--bundle", default=None)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--data", default=None, help="evaluate on this source instead of the config's data.source")
    p.add_argument("--split-mode", default=None, choices=["as_is", "by_class", "by_group"])
    p.add_argument("--limit-per-class", type=int_at_least(0), default=None, help="0 for no limit")
    p.add_argument("--baseline-weights", default="imagenet",
                   help="weights of the off-the-shelf row: imagenet (installed package), a local file, or none")
    p.add_argument("--batch-size", type=int_at_least(1), default=128)
    p.add_argument("--num-workers", type=workers, default="auto",
                   help="DataLoader worker processes, or auto ($DEEPFEAT_NUM_WORKERS, else as for embed)")
    p.add_argument("--json", default=None, type=out_file, help="also write the metrics to this JSON file")
    p.set_defaults(handler=_cmd_evaluate)
