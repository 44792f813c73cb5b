"""Lightning DDP on 2 CPU processes (gloo): the fashion recipe's ``fit`` with ``--trainer.strategy ddp``.

Two real DDP runs on tiny generated images, shared by the tests of this module: a fit of 2 epochs, then a resume
of its ``last.ckpt`` for a third epoch. The backbone is frozen for the first epoch (``FreezeBackbone``), so the
second epoch trains parameters DDP did not track when it wrapped the module. :class:`DDPRecorder` (appended to the
recipe's callbacks) writes what each rank saw, with the model, loss and miner themselves (whatever the recipe
holds); the tests compare it with the single-process computation in this process. The runs go through
``run_lightning_cli`` (the ``deepfeat fit`` entry) in a driver script, because Lightning's DDP launcher starts the
other rank by re-running the script of the current process.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
import yaml
from support.imagegen import make_image_folder
from typing_extensions import override

from deepfeat.finetune.inference.evaluate import evaluate_models
from deepfeat.finetune.models.bundle import ModelBundle
from deepfeat.finetune.models.model import EmbeddingModel
from deepfeat.finetune.training import ExportBundle, FreezeBackbone
from deepfeat.finetune.training.sampler import PKSampler

TESTS = Path(__file__).resolve().parent  # the driver imports this module (its callbacks) from here
TESTS_ROOT = TESTS.parent  # ... and the shared helpers (support/) from here
RECIPE = TESTS_ROOT.parent / "recipes" / "configs" / "fashion.yaml"
P, K, BATCHES, WORLD = 3, 2, 2, 2
RECORD_ENV = "DEEPFEAT_DDP_RECORD"

_DRIVER = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {tests!r})
    from deepfeat.finetune.training.config import run_lightning_cli
    run_lightning_cli(json.loads(os.environ["DEEPFEAT_DDP_ARGS"]))
""")


class DDPRecorder(pl.Callback):
    """Writes, per rank, the training batches and losses, the validation indices and metrics, and the export."""

    def __init__(self) -> None:
        self.out = Path(os.environ[RECORD_ENV])
        self.rec: dict[str, Any] = {"train": [], "val": []}
        self._val_idx: list[int] = []
        self._val_model: Any = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # after a restore
        self.rec.update(rank=trainer.global_rank, world=trainer.world_size, start_step=trainer.global_step,
                        start_epoch=trainer.current_epoch)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step == 0 and batch_idx == 0:
            m: Any = pl_module
            torch.save({"model": copy.deepcopy(m.model), "loss": copy.deepcopy(m.loss_fn),
                        "miner": copy.deepcopy(m.miner), "image": batch["image"], "label": batch["label"],
                        "train_labels": [int(x) for x in trainer.train_dataloader.dataset.labels]},  # type: ignore[union-attr]
                       self.out / f"step0-rank{trainer.global_rank}.pt")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.rec["train"].append({"epoch": trainer.current_epoch, "index": batch["index"].tolist(),
                                  "loss": float(outputs["loss"])})

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_idx = []
        self._val_model = copy.deepcopy(pl_module.model)  # after the EMA callback swapped the average in

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._val_idx += batch["index"].tolist()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.rec["val"].append({"epoch": trainer.current_epoch, "index": self._val_idx, "metrics": metrics})

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.out / f"{os.environ.get('DEEPFEAT_DDP_RUN', 'run')}-rank{trainer.global_rank}-final.pt")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        exporter = next(c for c in trainer.callbacks if isinstance(c, ExportBundle))  # type: ignore[attr-defined]
        self.rec.update(end_step=trainer.global_step, exported=str(exporter.exported) if exporter.exported else None)
        rank = trainer.global_rank
        name = f"{os.environ.get('DEEPFEAT_DDP_RUN', 'run')}-rank{rank}"
        torch.save(self._val_model, self.out / f"{name}-val-model.pt")
        if rank == 0:
            trainer.datamodule.eval_records("val").to_pickle(self.out / "val-records.pkl")  # type: ignore[attr-defined]
        (self.out / f"{name}.json").write_text(json.dumps(self.rec))


def _args(config: Path, data: Path, run: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(config),
        f"--data.source={data}", "--data.split_mode=by_group", "--data.fractions=[0.5,0.25,0.25]",
        "--data.limit_per_class=null", f"--data.p={P}", f"--data.k={K}", f"--data.batches_per_epoch={BATCHES}",
        "--data.num_workers=0", "--data.eval_batch_size=4",
        "--model.backbone=test_efficientnet", "--model.weights=none", "--model.image_size=32",
        # BatchNorm in eval mode: with batch statistics each rank would normalise by its own half of the batch
        # (Lightning's sync_batchnorm is the cure), and the gathered loss would not be the joint batch's
        "--model.embedding_dim=16", "--model.max_minutes=null", "--model.freeze_bn=true",
        f"--trainer.default_root_dir={run}",
        "--trainer.enable_progress_bar=false", "--trainer.callbacks+=test_ddp.DDPRecorder",
        "--trainer.strategy=ddp", f"--trainer.devices={WORLD}", "--trainer.accelerator=cpu", *extra,
    ]


def kill_group(proc: subprocess.Popen[str], sig: int = signal.SIGKILL) -> None:
    """Signal every process of ``proc``'s session (started with ``start_new_session``): the ranks Lightning started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def _launch(work: Path, name: str, args: list[str]) -> None:
    driver = work / "driver.py"
    driver.write_text(_DRIVER.format(tests=str(TESTS)))
    env = {**os.environ, "DEEPFEAT_DDP_ARGS": json.dumps(args), RECORD_ENV: str(work / "rec"),
           "DEEPFEAT_DDP_RUN": name,
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS_ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)  # this process is rank 0; Lightning sets it for the rank it starts
    run_driver(driver, env, work, f"DDP {name}")


def run_driver(driver: Path, env: dict[str, str], cwd: Path, what: str) -> str:
    """Run a DDP driver script as rank 0 in its own process group (Lightning starts the other ranks); its stdout.

    A run that does not end in 300 s (a rank waiting in a collective) fails the test; no rank outlives it.
    """
    proc = subprocess.Popen([sys.executable, str(driver)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        pytest.fail(f"{what} did not end in 300 s (a rank waiting in a collective?)")
    finally:
        kill_group(proc, signal.SIGTERM)  # no rank may outlive the run
    assert proc.returncode == 0, f"{what} failed (rc {proc.returncode}):\n{stderr[-4000:]}"
    return stdout


def _read(work: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads((work / "rec" / f"{name}-rank{r}.json").read_text()) for r in range(WORLD)]


def _recipe(cfg: dict[str, Any]) -> dict[str, Any]:
    """The fashion recipe with the guard off, one frozen-backbone epoch, and early stopping checked at validation."""
    callbacks = [c for c in cfg["trainer"]["callbacks"] if not c["class_path"].endswith("FreezeBackbone")]
    for c in callbacks:
        args = c.setdefault("init_args", {})
        if c["class_path"].endswith("ExportBundle"):
            # the random test backbone's features might be kept: export what trained, without the extras
            args.update(guard=False, onnx=False, whiten=False, flip_tta=False)
        if c["class_path"].endswith("EarlyStopping"):
            # a run resumed from a checkpoint saved at validation end restarts at the end of that training epoch,
            # where the validation metric EarlyStopping checks is not logged yet
            args["check_on_train_epoch_end"] = False
    callbacks.insert(0, {"class_path": f"{FreezeBackbone.__module__}.FreezeBackbone", "init_args": {"epochs": 1}})
    cfg["trainer"]["callbacks"] = callbacks
    return cfg


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch DDP fit of the fashion recipe, then its resume from ``last.ckpt`` for a third epoch."""
    work = tmp_path_factory.mktemp("ddp")
    (work / "rec").mkdir()
    data = make_image_folder(work / "imgs", n_classes=4, per_class=8, size=32)
    recipe = work / "fashion.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(yaml.safe_load(RECIPE.read_text())), sort_keys=False))
    _launch(work, "fit", [*_args(recipe, data, work / "run"), "--trainer.max_epochs=2"])
    last = sorted((work / "run").rglob("last.ckpt"))
    assert last, f"no last.ckpt under {work / 'run'}"
    ckpt = torch.load(last[0], map_location="cpu", weights_only=False)
    (work / "rec" / "last-ckpt.json").write_text(json.dumps({k: ckpt[k] for k in ("epoch", "global_step")}))
    _launch(work, "resume", [*_args(recipe, data, work / "run"), "--trainer.max_epochs=3", f"--ckpt_path={last[0]}"])
    return work


def _load(path: Path) -> Any:
    return torch.load(path, weights_only=False)  # whole objects this test's own runs pickled


def _global_batches(labels: list[int], epoch: int) -> list[list[int]]:
    sampler = PKSampler(labels, p=P, k=K, batches_per_epoch=BATCHES * WORLD, seed=0, num_replicas=1, rank=0)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_ranks_train_on_disjoint_shares_of_one_batch_sequence(ddp: Path) -> None:
    recs = _read(ddp, "fit")
    assert [r["rank"] for r in recs] == [0, 1] and all(r["world"] == WORLD for r in recs)
    labels = _load(ddp / "rec" / "step0-rank0.pt")["train_labels"]
    for epoch in (0, 1):
        per_rank = [[b["index"] for b in r["train"] if b["epoch"] == epoch] for r in recs]
        assert [len(b) for b in per_rank] == [BATCHES, BATCHES]  # the same count on every rank
        assert not {tuple(b) for b in per_rank[0]} & {tuple(b) for b in per_rank[1]}
        expected = _global_batches(labels, epoch)
        assert per_rank[0] == expected[0::WORLD] and per_rank[1] == expected[1::WORLD]


def test_gathered_loss_equals_the_single_process_loss_of_the_joint_batch(ddp: Path) -> None:
    steps = [_load(ddp / "rec" / f"step0-rank{r}.pt") for r in range(WORLD)]
    recs = _read(ddp, "fit")
    one = steps[1]["model"].state_dict()
    assert all(torch.equal(v, one[k]) for k, v in steps[0]["model"].state_dict().items())  # one model
    model: EmbeddingModel = steps[0]["model"].eval()  # frozen BatchNorm statistics (freeze_bn), no dropout
    loss_fn, miner = steps[0]["loss"], steps[0]["miner"]

    def loss_of(emb: torch.Tensor, labels: torch.Tensor) -> float:
        return float(loss_fn(emb, labels, miner(emb, labels) if miner is not None else None))

    images = torch.cat([s["image"] for s in steps]).contiguous(memory_format=torch.channels_last)
    labels = torch.cat([s["label"] for s in steps])
    with torch.no_grad():
        emb = model(images)
        joint = loss_of(emb, labels)
        local = loss_of(emb[: P * K], labels[: P * K])
    ddp_losses = [r["train"][0]["loss"] for r in recs]
    assert ddp_losses[0] == pytest.approx(joint, abs=1e-5) and ddp_losses[1] == pytest.approx(joint, abs=1e-5)
    assert abs(local - joint) > 1e-4, "rank 0's own batch alone gives the same loss: the check would prove nothing"


def test_ranks_keep_one_model_after_the_backbone_is_unfrozen(ddp: Path) -> None:
    # the backbone required no gradient when DDP wrapped the module (FreezeBackbone): DDP does not synchronise it,
    # the module does; unsynchronised, each rank's backbone would follow its own half of the batch
    finals = [torch.load(ddp / "rec" / f"fit-rank{r}-final.pt") for r in range(WORLD)]
    assert set(finals[0]) == set(finals[1])
    differ = [k for k, v in finals[0].items() if not torch.equal(v, finals[1][k])]
    assert not differ, f"the ranks' weights differ after training: {differ[:5]}"
    start = _load(ddp / "rec" / "step0-rank0.pt")["model"].state_dict()
    trained = [k for k, v in start.items() if k.startswith("backbone.") and v.is_floating_point()
               and not torch.equal(v, finals[0][f"model.{k}"])]
    assert trained, "the backbone did not train in the second epoch: the check would prove nothing"


def test_validation_metrics_cover_the_whole_val_split(ddp: Path) -> None:
    recs = _read(ddp, "fit")
    records = pd.read_pickle(ddp / "rec" / "val-records.pkl")
    last = [r["val"][-1] for r in recs]
    seen = [set(v["index"]) for v in last]
    assert seen[0] | seen[1] == set(range(len(records)))  # together the ranks embed the whole split ...
    assert all(len(s) < len(records) for s in seen)  # ... each only its share of it
    model = _load(ddp / "rec" / "fit-rank0-val-model.pt").eval()
    single = evaluate_models({"m": model}, records, batch_size=16)["m"]
    for v in last:
        assert v["metrics"]["val/map_at_r"] == pytest.approx(single["map_at_r"], abs=1e-6)
        assert v["metrics"]["val/recall_at_1"] == pytest.approx(single["recall_at_1"], abs=1e-6)


def test_only_rank_zero_exports_the_bundle_and_card(ddp: Path) -> None:
    recs = _read(ddp, "fit")
    assert recs[1]["exported"] is None
    exported = ddp / recs[0]["exported"]  # the recipe's dirpath, relative to the run's working folder
    bundle = ModelBundle.load(exported)  # the resumed run (3 epochs) exported over the fit's bundle, on rank 0 only
    assert bundle.dim == 16 and bundle.card.training["steps"] == 3 * BATCHES


def test_a_checkpoint_resumes_at_the_next_epoch(ddp: Path) -> None:
    fit, resumed = _read(ddp, "fit"), _read(ddp, "resume")
    saved = json.loads((ddp / "rec" / "last-ckpt.json").read_text())  # Lightning writes last.ckpt with a new best
    start = saved["epoch"] + 1  # saved at the end of that epoch's validation
    labels = _load(ddp / "rec" / "step0-rank0.pt")["train_labels"]
    for r in range(WORLD):
        assert fit[r]["end_step"] == 2 * BATCHES
        assert resumed[r]["start_epoch"] == start
        assert resumed[r]["start_step"] == saved["global_step"] == start * BATCHES
        assert resumed[r]["end_step"] == 3 * BATCHES
        for epoch in range(start, 3):
            expected = _global_batches(labels, epoch)
            assert [b["index"] for b in resumed[r]["train"] if b["epoch"] == epoch] == expected[r::WORLD]
    assert resumed[0]["exported"] and resumed[1]["exported"] is None
