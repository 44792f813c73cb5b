"""Layer sweep benchmark: last layer vs best single layer vs full-network embedding (vs fine-tuned).

Runs ``deepfeat layers`` (same options) and adds a ``benchmark.json`` beside the CSV and PNG with the
command, the wall time, the machine and the table, so a result can be quoted with how it was made::

    python benchmarks/layers.py --limit-per-class 200 --image-size 64 --out /tmp/layers-fmnist
    python benchmarks/layers.py ... --bundle runs/fashion/bundle     # adds the fine-tuned row

Defaults: Fashion-MNIST, EfficientNet-Lite0 with its installed ImageNet weights, the first 200 test
images per class (all-vs-all retrieval, 2,000 queries) and, for the FNE statistics, the first 200
training images per class.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from deepfeat.recipes.cli import layers


def main(argv: list[str] | None = None) -> int:
    """Parse ``deepfeat layers`` options, run the sweep, write ``benchmark.json``."""
    parser = argparse.ArgumentParser(prog="benchmarks/layers.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    layers.add_cli(sub)
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(["layers", *args_list])
    if args.out == "layers-report":
        args.out = "benchmarks/results/layers"
    start = time.perf_counter()
    rc = layers.run(args)
    wall = time.perf_counter() - start
    out = Path(args.out)
    table = (out / "layers.csv").read_text()
    report = {
        "command": "python benchmarks/layers.py " + " ".join(args_list),
        "wall_seconds": round(wall, 1),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "table_csv": table,
    }
    (out / "benchmark.json").write_text(json.dumps(report, indent=2))
    print(f"benchmark: {wall:.1f} s wall; {out / 'benchmark.json'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
