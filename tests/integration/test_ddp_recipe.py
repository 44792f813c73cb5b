"""The guarded pipeline under Lightning DDP: ``deepfeat recipe run fashion`` on 2 CPU processes (gloo).

One real run of the CLI (``recipe run``: guarded fit, export, embed, Milvus Lite load, the recipe's searches) with
``--set trainer.strategy=ddp trainer.devices=2``, shared by the tests of this module. Lightning's launcher starts
rank 1 by re-running the driver script; each process records, through a Python audit hook (no mock: the
interpreter's own record of what the process did), the files it wrote under the run's folder and every file it
opened in the Milvus Lite database, and :class:`BudgetProbe` records where each rank stopped training.

The model reads mid-level layers (``model.layers``), so the blocks after them get no gradient: the module freezes
them before DDP wraps it (DDP fails on the second step otherwise). The run also has a wall-clock budget
(``model.max_minutes``) and rank 1 is held back once: the ranks' clocks then disagree, and the run ends only if
every rank stops at the same step (a rank that stops alone leaves the other waiting in a collective).
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from support.recipes import TINY, make_catalogue
from test_ddp import run_driver
from typing_extensions import override

from deepfeat.connectors import connect
from deepfeat.finetune.models.bundle import ModelBundle

TESTS = Path(__file__).resolve().parent  # the driver imports this module (its callbacks) from here
TESTS_ROOT = TESTS.parent  # ... and the shared helpers (support/) from here
WORLD, BATCHES, EPOCHS = 2, 3, 4
BUDGET_MINUTES = 0.03  # 1.8 s of training: rank 1's 2.5 s pause puts one clock past it, the other not
HOLD_SECONDS = 2.5

_DRIVER = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {tests!r})
    out = os.path.abspath(os.environ["DEEPFEAT_DDP_OUT"])
    db = os.path.join(out, "milvus.db")
    seen = {{"writes": set(), "db": set()}}

    def audit(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(args[0]))
            mode, flags = args[1] or "", args[2] or 0
            if path.startswith(db):
                seen["db"].add(path)
            if path.startswith(out) and (set(mode) & set("wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                seen["writes"].add(path)
        elif event in ("os.mkdir", "os.rename", "os.remove", "shutil.rmtree"):
            paths = args[:2] if event == "os.rename" else args[:1]  # a rename writes its target too
            for path in (os.path.abspath(os.fsdecode(a)) for a in paths if isinstance(a, (str, bytes))):
                if path.startswith(out) and path != out:
                    seen["writes"].add(path)

    rank = int(os.environ.get("LOCAL_RANK", "0"))
    sys.addaudithook(audit)
    from deepfeat.recipes.cli import main
    code = main(json.loads(os.environ["DEEPFEAT_DDP_ARGS"]))
    record = {{"rank": rank, "code": code, "writes": sorted(seen["writes"]), "db": sorted(seen["db"])}}
    with open(os.path.join(os.environ["DEEPFEAT_DDP_RECORD"], f"driver-rank{{rank}}.json"), "w") as f:
        json.dump(record, f)
    sys.exit(code)
""")


class BudgetProbe(pl.Callback):
    """Holds rank 1 back after its first batch (its budget clock then starts late) and records where ranks stop."""

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == 1 and trainer.global_rank == 1:
            time.sleep(HOLD_SECONDS)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = Path(os.environ["DEEPFEAT_DDP_RECORD"]) / f"fit-rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"rank": trainer.global_rank, "world": trainer.world_size,
                                    "end_step": trainer.global_step}))


def _run_ddp(work: Path, args: list[str], out: Path, *, probe: bool = True) -> dict[str, Any]:
    """Run ``deepfeat ARGS`` through the audited driver (Lightning re-runs it as rank 1); what each rank did."""
    record = work / "rec"
    record.mkdir()
    driver = work / "driver.py"
    driver.write_text(_DRIVER.format(tests=str(TESTS)))
    env = {**os.environ, "DEEPFEAT_DDP_ARGS": json.dumps(args), "DEEPFEAT_DDP_RECORD": str(record),
           "DEEPFEAT_DDP_OUT": str(out), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS_ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("LOCAL_RANK", None)
    stdout = run_driver(driver, env, work, f"the DDP run of {args[:2]}")
    drivers = {r: json.loads((record / f"driver-rank{r}.json").read_text()) for r in range(WORLD)}
    fits = {r: json.loads((record / f"fit-rank{r}.json").read_text()) for r in range(WORLD)} if probe else {}
    return {"out": out, "stdout": stdout, "drivers": drivers, "fits": fits}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("ddp-recipe")
    out = work / "out"
    manifest = make_catalogue(work / "catalogue")
    args = ["recipe", "run", "fashion", "--data", str(manifest), "--out", str(out), "--uri", str(out / "milvus.db"),
            "--quiet", "--set", *TINY, "data.fractions=[0.5,0.25,0.25]", f"data.batches_per_epoch={BATCHES}",
            f"trainer.max_epochs={EPOCHS}", f"model.max_minutes={BUDGET_MINUTES}", "recipe.search.n_queries=2",
            "trainer.strategy=ddp", f"trainer.devices={WORLD}", "trainer.accelerator=cpu",
            "trainer.callbacks+=test_ddp_recipe.BudgetProbe", "model.layers=[2,3]"]
    return _run_ddp(work, args, out)


def test_both_ranks_train_and_stop_at_the_same_step(run: dict[str, Any]) -> None:
    fits = run["fits"]
    assert all(fits[r]["world"] == WORLD and fits[r]["rank"] == r for r in range(WORLD))
    steps = {fits[r]["end_step"] for r in range(WORLD)}
    assert len(steps) == 1, f"the ranks stopped at different steps: {fits}"
    assert 2 <= steps.pop() < BATCHES * EPOCHS  # the budget ended the run, not max_epochs
    assert all(d["code"] == 0 for d in run["drivers"].values())


def test_only_rank_zero_exports_loads_and_reports(run: dict[str, Any]) -> None:
    out, drivers = run["out"], run["drivers"]
    assert run["stdout"].count("bundle:") == 1  # rank 1 ran the same command and printed nothing
    assert run["stdout"].count("deepfeat recipe fashion:") == 1, run["stdout"]  # not even the header
    report = json.loads((out / "recipe.json").read_text())
    assert report["rank"] == 0 and report["n_loaded"] == report["n_records"] == 48
    bundle = ModelBundle.load(report["bundle"])
    assert bundle.card.training["steps"] == run["fits"][0]["end_step"]  # exported by the DDP fit
    conn = connect(str(out / "milvus.db"))
    try:
        assert conn.count(report["collection"]) == 48
    finally:
        conn.release_lite()
    zero, one = drivers[0], drivers[1]
    bundle_dir = str(Path(report["bundle"]).resolve())
    assert any(p.startswith(bundle_dir) for p in zero["writes"]), zero["writes"]  # the probe sees rank 0's work
    assert zero["db"]
    assert not one["db"], f"rank 1 opened the Milvus database: {one['db'][:5]}"
    assert not one["writes"], f"rank 1 wrote under the run's folder: {one['writes'][:5]}"


def test_quickstart_under_ddp_reports_once_and_rank_one_touches_nothing(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    work = tmp_path_factory.mktemp("ddp-quickstart")
    out = work / "out"
    manifest = make_catalogue(work / "catalogue")
    args = ["quickstart", "--tiny", "--data", str(manifest), "--out", str(out), "--quiet", "--set",
            "trainer.strategy=ddp", f"trainer.devices={WORLD}", "trainer.accelerator=cpu"]
    res = _run_ddp(work, args, out, probe=False)
    assert res["stdout"].count("bundle:") == 1 and "held-out test" in res["stdout"]
    assert res["stdout"].count("deepfeat quickstart:") == 1, res["stdout"]
    report = json.loads((out / "quickstart.json").read_text())
    assert report["rank"] == 0 and report["n_loaded"] > 0 and Path(report["picture"]).is_file()
    zero, one = res["drivers"][0], res["drivers"][1]
    assert zero["code"] == one["code"] == 0 and zero["db"]
    assert not one["db"], f"rank 1 opened the Milvus database: {one['db'][:5]}"
    assert not one["writes"], f"rank 1 wrote under the quickstart's folder: {one['writes'][:5]}"
