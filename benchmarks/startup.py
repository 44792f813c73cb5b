"""Start-up: wall seconds of the quick commands a newcomer types first, against a bare Python start, in one run.

Each command runs as the user runs it (a fresh ``deepfeat`` process), ``--repeats`` times, alternated with a bare
``python -c pass`` so that a shared machine slows both alike. Goal (issue 21): ``deepfeat --help``,
``deepfeat recipe list`` and ``deepfeat collections list`` under 2 s each. ``collections list`` opens a Milvus
Lite database holding one small collection (created here first, outside the timing).

    python benchmarks/startup.py
    python benchmarks/startup.py --repeats 9 --json startup.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import median, spread, table

GOAL_SECONDS = 2.0


def _deepfeat() -> list[str]:
    exe = Path(sys.executable).with_name("deepfeat")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "deepfeat.recipes.cli"]


def _wall(argv: list[str], cwd: Path) -> float:
    t = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
    return seconds


def _make_database(db: Path) -> None:
    """One small collection (8-dim, 10 rows), made with pymilvus in a separate process."""
    code = ("import sys; from pymilvus import MilvusClient; c = MilvusClient(sys.argv[1]); "
            "c.create_collection('items', dimension=8); "
            "c.insert('items', [{'id': i, 'vector': [float(i)] * 8} for i in range(10)]); c.close()")
    subprocess.run([sys.executable, "-c", code, str(db)], check=True, capture_output=True)


def main() -> None:
    """Time the commands and print a table of medians (min-max), the ratio to a bare start and the goal."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command (default 5)")
    parser.add_argument("--json", default=None, help="write the raw seconds here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="deepfeat-startup-"))
    try:
        db = work / "cat.db"
        _make_database(db)
        cli = _deepfeat()
        commands = {"deepfeat --help": [*cli, "--help"], "deepfeat recipe list": [*cli, "recipe", "list"],
                    "deepfeat collections list": [*cli, "collections", "list", "--uri", str(db)]}
        bare = [sys.executable, "-c", "pass"]
        for argv in commands.values():  # warm the file cache and the bytecode once, untimed
            _wall(argv, work)
        seconds: dict[str, list[float]] = {name: [] for name in commands}
        seconds["python -c pass"] = []
        for _ in range(args.repeats):
            for name, argv in commands.items():
                seconds["python -c pass"].append(_wall(bare, work))
                seconds[name].append(_wall(argv, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = median(seconds["python -c pass"])
    rows = []
    for name in commands:
        m = median(seconds[name])
        rows.append([name, spread(seconds[name]), f"{m / base:.1f}x",
                     f"{'PASS' if m < GOAL_SECONDS else 'MISS'} (goal < {GOAL_SECONDS:g} s)"])
    rows.append(["python -c pass (baseline)", spread(seconds["python -c pass"]), "1.0x", ""])
    print(table(["command", "seconds, median (min-max)", "vs bare Python", "goal"], rows))
    if args.json:
        Path(args.json).write_text(json.dumps(seconds, indent=2))


if __name__ == "__main__":
    main()
