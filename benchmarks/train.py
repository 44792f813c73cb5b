"""Training throughput: Lightning ``Trainer.fit`` of MetricLearningModule vs a plain PyTorch loop.

Both sides train the same :class:`~deepfeat.finetune.models.model.EmbeddingModel` (same initial weights),
with the same pytorch-metric-learning loss (MultiSimilarityLoss), the same AdamW parameter groups and
learning-rate schedule as ``MetricLearningModule.configure_optimizers``, frozen BatchNorm statistics
(``freeze_bn=True``, the module's default), the same precision and the very same PK batches, built
once as tensors in memory (data loading is excluded from both). The first ``--warmup`` steps are not
timed; the rate is taken over the next ``--steps`` optimizer steps. The two sides alternate
``--repeats`` times and the median of the per-repeat ratios is reported against the goal (>= 0.95).

The images are random tensors: the step time of this model and loss does not depend on the pixels.

    python benchmarks/train.py                          # CPU, Lite0 at 64 px, batch 16 (4 classes x 4)
    python benchmarks/train.py --image-size 128 --steps 20 --repeats 5
    python benchmarks/train.py --device cuda --precision bf16-mixed --image-size 224 --batch-size 128
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from _common import goal_mark, machine, median, spread, table
from pytorch_metric_learning.losses import MultiSimilarityLoss
from torch import nn

from deepfeat.finetune.inference.runtime import tune_cpu_allocator
from deepfeat.finetune.training.module import MetricLearningModule

GOAL = 0.95
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


def make_batches(n: int, classes: int, per_class: int, image_size: int, seed: int, pin: bool) -> list[dict[str, Any]]:
    """``n`` PK batches (``classes`` x ``per_class``) of random images, in the data module's batch layout."""
    gen = torch.Generator().manual_seed(seed)
    size = classes * per_class
    batches = []
    for i in range(n):
        labels = (torch.arange(classes) + i * classes) % (4 * classes)
        image = torch.randn(size, 3, image_size, image_size, generator=gen)
        batches.append(
            {
                "image": image.pin_memory() if pin else image,
                "label": labels.repeat_interleave(per_class),
                "index": torch.arange(i * size, (i + 1) * size),
                "errors": [],
            }
        )
    return batches


def new_module(args: argparse.Namespace, state: dict[str, torch.Tensor] | None) -> MetricLearningModule:
    """A fresh module (MultiSimilarityLoss, no miner); ``state`` makes every copy start from the same weights."""
    module = MetricLearningModule(
        backbone=args.backbone,
        weights=args.weights if state is None else "none",
        image_size=args.image_size,
        loss=MultiSimilarityLoss(),
    )
    if state is not None:
        module.load_state_dict(state)
    return module


class _Batches(torch.utils.data.Dataset[dict[str, Any]]):
    def __init__(self, batches: Sequence[dict[str, Any]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.batches[index]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rate_from(stamps: Sequence[float], warmup: int) -> float:
    """Steps per second after the first ``warmup`` steps (``stamps[i]``: the end of step ``i``)."""
    if len(stamps) <= warmup:
        raise SystemExit(f"only {len(stamps)} steps were timed; need more than --warmup={warmup}")
    return (len(stamps) - warmup) / (stamps[-1] - stamps[warmup - 1])


def run_lightning(
    args: argparse.Namespace, state: dict[str, torch.Tensor], batches: Sequence[dict[str, Any]], device: torch.device
) -> float:
    """Trainer.fit over the batches; steps/s from a callback's time stamps after each optimizer step."""
    import lightning.pytorch as pl

    stamps: list[float] = []

    class Stamp(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *rest: Any) -> None:
            _sync(device)
            stamps.append(time.perf_counter())

    module = new_module(args, state)
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=args.precision,
        max_steps=len(batches),
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Stamp()],
    )
    loader = torch.utils.data.DataLoader(_Batches(batches), batch_size=None, shuffle=False, num_workers=0)
    trainer.fit(module, train_dataloaders=loader)
    return rate_from(stamps, args.warmup)


def plain_optimizer(module: MetricLearningModule, total_steps: int) -> tuple[Any, Any]:
    """AdamW and LambdaLR exactly as ``configure_optimizers`` builds them, without a Trainer."""

    class _Trainer:
        estimated_stepping_batches = total_steps

    module._trainer = _Trainer()  # type: ignore[assignment]  # configure_optimizers reads only this
    try:
        config = module.configure_optimizers()
    finally:
        module._trainer = None
    return config["optimizer"], config["lr_scheduler"]["scheduler"]


def run_plain(
    args: argparse.Namespace, state: dict[str, torch.Tensor], batches: Sequence[dict[str, Any]], device: torch.device
) -> float:
    """The same model, loss, optimizer, schedule, frozen BN and precision in a hand-written loop."""
    module = new_module(args, state)
    model, loss_fn = module.model.to(device), module.loss_fn.to(device)
    optimizer, scheduler = plain_optimizer(module, len(batches))
    model.train()
    for m in model.backbone.modules():  # freeze_bn=True: BatchNorm statistics stay fixed
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "16-mixed")
    stamps = []
    for batch in batches:
        x = batch["image"].to(device, non_blocking=True)
        if module.hparams["channels_last"]:  # the module's layout, as a tuned hand-written loop would
            x = x.contiguous(memory_format=torch.channels_last)
        y = batch["label"].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with autocast:
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        _sync(device)
        stamps.append(time.perf_counter())
    return rate_from(stamps, args.warmup)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Lightning's start-up messages (GPU available, ...) would bury the table."""
    names = ("lightning.pytorch", "lightning.fabric", "lightning")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=4, help="P of the PK batch")
    parser.add_argument("--per-class", type=int, default=4, help="K of the PK batch")
    parser.add_argument("--warmup", type=int, default=2, help="steps not timed")
    parser.add_argument("--steps", type=int, default=8, help="steps timed per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="32-true", choices=PRECISIONS)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "--device cuda: no CUDA device is available here (torch.cuda.is_available() is False); "
            "run without --device for the CPU figures"
        )
    if args.precision == "16-mixed" and device.type != "cuda":
        raise SystemExit("--precision 16-mixed needs --device cuda; use 32-true or bf16-mixed on CPU")
    if args.warmup < 1:
        raise SystemExit("--warmup must be at least 1 (the first step includes one-off set-up)")

    # one allocator for both sides from the first repeat on (the Lightning side would tune it when its fit
    # starts, and the plain loop shares the process)
    tune_cpu_allocator()
    print(f"machine: {machine()}")
    batch_size = args.classes * args.per_class
    print(
        f"{args.backbone} at {args.image_size} px, batch {batch_size} ({args.classes} x {args.per_class}), "
        f"MultiSimilarityLoss, {args.precision}, {args.warmup} warm-up + {args.steps} timed steps, device {device}"
    )
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in new_module(args, None).state_dict().items()}
    batches = make_batches(
        args.warmup + args.steps, args.classes, args.per_class, args.image_size, 0, device.type == "cuda"
    )
    rates: dict[str, list[float]] = {"lightning": [], "plain": []}
    ratios = []
    for rep in range(args.repeats):
        order = ["lightning", "plain"] if rep % 2 == 0 else ["plain", "lightning"]
        got = {}
        for side in order:
            with _quiet():
                got[side] = (run_lightning if side == "lightning" else run_plain)(args, state, batches, device)
        for side, value in got.items():
            rates[side].append(value)
        ratios.append(got["lightning"] / got["plain"])
        print(
            f"repeat {rep + 1}/{args.repeats}: Lightning {got['lightning']:.3f} steps/s, "
            f"plain {got['plain']:.3f} steps/s, ratio {ratios[-1]:.3f}",
            flush=True,
        )
    ratio = median(ratios)
    print()
    print(
        table(
            ["loop", "steps/s, median (min-max)", "images/s (median)"],
            [
                ["plain PyTorch loop", spread(rates["plain"]), f"{median(rates['plain']) * batch_size:.1f}"],
                ["Lightning Trainer.fit", spread(rates["lightning"]), f"{median(rates['lightning']) * batch_size:.1f}"],
            ],
        )
    )
    print()
    print(f"Lightning / plain (median of per-repeat ratios): {ratio:.3f}x  {goal_mark(ratio, GOAL)}")
    result = {
        "machine": machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "rates": rates,
        "ratios": ratios,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
