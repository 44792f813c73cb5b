"""CPU step time with deepfeat's glibc malloc tuning against glibc's defaults (``deepfeat.finetune.inference.runtime``).

Each measurement is a fresh child process, so the two allocator settings never share a heap: the
child builds ``MetricLearningModule`` (EfficientNet-Lite0, trainable BatchNorm as in the quality recipe),
calls ``tune_cpu_allocator()`` (``DEEPFEAT_MALLOC_TUNING=0`` in the baseline's environment turns it
off), then times ``--steps`` training steps (forward, loss, backward, fused AdamW) on one PK batch of
random images after ``--warmup`` untimed ones, and ``--steps`` inference batches of the same size (no
grad, as when embedding). The two settings alternate ``--repeats`` times; the medians of the per-repeat
ratios are reported against the goal (training >= 1.1x) with each child's peak RSS, which the tuning
should leave about where it was.

    python benchmarks/allocator.py                              # Lite0 at 64 px, batch 120 (10 x 12)
    python benchmarks/allocator.py --image-size 224 --batch-size 32 --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import goal_mark, machine, median, spread, table

from deepfeat.finetune.inference.runtime import ENV

GOAL_TRAIN = 1.1

_CHILD = r"""
import json, resource, sys, time, torch
from deepfeat.finetune.training.module import MetricLearningModule
from deepfeat.finetune.inference.runtime import tune_cpu_allocator

size, batch, warmup, steps = (int(v) for v in sys.argv[1:5])
applied = tune_cpu_allocator()
torch.manual_seed(0)
module = MetricLearningModule(image_size=size, embedding_dim=256, freeze_bn=False)
model = module.model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
y = torch.arange(batch) % max(2, batch // 12)

def train_step():
    opt.zero_grad(set_to_none=True)
    module.loss_fn(model(x), y).backward()
    opt.step()

def infer_step():
    with torch.no_grad():
        model(x)

out = {"applied": applied}
for name, step in (("train", train_step), ("infer", infer_step)):
    model.train(name == "train")
    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    out[name] = steps / (time.perf_counter() - t)
out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def run_child(tuned: bool, args: argparse.Namespace) -> dict[str, Any]:
    """One child process's rates (steps/s) and peak RSS, with the tuning on or off."""
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "LD_PRELOAD")}
    if not tuned:
        env[ENV] = "0"
    argv = [str(v) for v in (args.image_size, args.batch_size, args.warmup, args.steps)]
    proc = subprocess.run([sys.executable, "-c", _CHILD, *argv], env=env, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the benchmark child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["applied"] != tuned:
        state = "off" if tuned else "on"
        raise SystemExit(f"the tuning came out {state} in a child meant to run with it {'on' if tuned else 'off'} "
                         "(not glibc, or LD_PRELOAD names another allocator?)")
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=3, help="steps not timed")
    parser.add_argument("--steps", type=int, default=10, help="steps timed per child and mode")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps must be at least 1")

    print(f"machine: {machine()}")
    print(f"EfficientNet-Lite0 at {args.image_size} px, batch {args.batch_size}, CPU, fp32, channels_last; "
          f"{args.warmup} warm-up + {args.steps} timed steps per child")
    runs: dict[str, list[dict[str, Any]]] = {"default": [], "tuned": []}
    ratios: dict[str, list[float]] = {"train": [], "infer": []}
    for rep in range(args.repeats):
        order = [False, True] if rep % 2 == 0 else [True, False]
        got = {tuned: run_child(tuned, args) for tuned in order}
        runs["tuned"].append(got[True])
        runs["default"].append(got[False])
        for mode in ratios:
            ratios[mode].append(got[True][mode] / got[False][mode])
        print(f"repeat {rep + 1}/{args.repeats}: train {got[False]['train']:.2f} -> {got[True]['train']:.2f} "
              f"steps/s, inference {got[False]['infer']:.2f} -> {got[True]['infer']:.2f} batches/s", flush=True)
    rows = []
    for name, label in (("default", "glibc defaults (DEEPFEAT_MALLOC_TUNING=0)"), ("tuned", "deepfeat's tuning")):
        rs = runs[name]
        rows.append([label, spread([r["train"] for r in rs]), spread([r["infer"] for r in rs]),
                     f"{median([r['peak_rss_mib'] for r in rs]):.0f}"])
    print()
    print(table(["allocator", "train steps/s", "inference batches/s", "peak RSS MiB"], rows))
    train, infer = median(ratios["train"]), median(ratios["infer"])
    print()
    print(f"tuned / default, training (median of per-repeat ratios): {train:.3f}x  {goal_mark(train, GOAL_TRAIN)}")
    print(f"tuned / default, inference: {infer:.3f}x")
    result = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
              "ratio_train": train, "ratio_infer": infer, "goal_train": GOAL_TRAIN}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
