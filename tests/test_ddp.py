"""Lightning DDP on 2 CPU processes (gloo): the fashion recipe's ``fit`` with ``--trainer.strategy ddp``.

Two real DDP runs on tiny generated images, shared by the tests of this module: a fit of 2 epochs, then a resume
of its ``last.ckpt`` for a third epoch. :class:`DDPRecorder` (appended to the recipe's callbacks) writes what each
rank saw; the tests compare it with the single-process computation in this process. The runs go through
``run_lightning_cli`` (the ``deepfeat fit`` entry) in a driver script, because Lightning's DDP launcher starts the
other rank by re-running the script of the current process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
from imagegen import make_image_folder
from pytorch_metric_learning.losses import MultiSimilarityLoss
from pytorch_metric_learning.miners import MultiSimilarityMiner
from typing_extensions import override

from deepfeat.finetune.inference.evaluate import evaluate_models
from deepfeat.finetune.models.bundle import ModelBundle
from deepfeat.finetune.models.model import EmbeddingModel, build_embedding_model
from deepfeat.finetune.training import ExportBundle
from deepfeat.finetune.training.sampler import PKSampler

TESTS = Path(__file__).resolve().parent
RECIPE = TESTS.parent / "recipes" / "configs" / "fashion.yaml"
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
        self._val_state: dict[str, torch.Tensor] = {}

    def _model_state(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}  # type: ignore[union-attr]

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # after a restore
        self.rec.update(rank=trainer.global_rank, world=trainer.world_size, start_step=trainer.global_step,
                        start_epoch=trainer.current_epoch)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step == 0 and batch_idx == 0:
            torch.save({"state": self._model_state(pl_module), "image": batch["image"], "label": batch["label"],
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
        self._val_state = self._model_state(pl_module)  # after the EMA callback swapped the average in

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._val_idx += batch["index"].tolist()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.rec["val"].append({"epoch": trainer.current_epoch, "index": self._val_idx, "metrics": metrics})

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        exporter = next(c for c in trainer.callbacks if isinstance(c, ExportBundle))  # type: ignore[attr-defined]
        self.rec.update(end_step=trainer.global_step, exported=str(exporter.exported) if exporter.exported else None)
        rank = trainer.global_rank
        name = f"{os.environ.get('DEEPFEAT_DDP_RUN', 'run')}-rank{rank}"
        torch.save(self._val_state, self.out / f"{name}-val-state.pt")
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
        "--model.embedding_dim=16", "--model.max_minutes=null", f"--trainer.default_root_dir={run}",
        "--trainer.enable_progress_bar=false", "--trainer.callbacks+=test_ddp.DDPRecorder",
        "--trainer.strategy=ddp", f"--trainer.devices={WORLD}", "--trainer.accelerator=cpu", *extra,
    ]


def _launch(work: Path, name: str, args: list[str]) -> None:
    driver = work / "driver.py"
    driver.write_text(_DRIVER.format(tests=str(TESTS)))
    env = {**os.environ, "DEEPFEAT_DDP_ARGS": json.dumps(args), RECORD_ENV: str(work / "rec"),
           "DEEPFEAT_DDP_RUN": name, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(driver)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"DDP {name} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"


def _read(work: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads((work / "rec" / f"{name}-rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch DDP fit of the fashion recipe, then its resume from ``last.ckpt`` for a third epoch."""
    work = tmp_path_factory.mktemp("ddp")
    (work / "rec").mkdir()
    data = make_image_folder(work / "imgs", n_classes=4, per_class=8, size=32)
    # guard off: the random test backbone's "off-the-shelf" features might be kept; export what trained
    recipe = work / "fashion.yaml"
    # check_on_train_epoch_end false: a run resumed from a checkpoint saved at validation end restarts at the end
    # of that training epoch, where the validation metric EarlyStopping checks is not logged yet
    text = RECIPE.read_text().replace("guard: true", "guard: false")
    recipe.write_text(text.replace("patience: 3", "patience: 3\n        check_on_train_epoch_end: false"))
    _launch(work, "fit", [*_args(recipe, data, work / "run"), "--trainer.max_epochs=2"])
    last = sorted((work / "run").rglob("last.ckpt"))
    assert last, f"no last.ckpt under {work / 'run'}"
    _launch(work, "resume", [*_args(recipe, data, work / "run"), "--trainer.max_epochs=3", f"--ckpt_path={last[0]}"])
    return work


def _model(state: dict[str, torch.Tensor]) -> EmbeddingModel:
    model = build_embedding_model("test_efficientnet", "none", head="linear", embedding_dim=16, image_size=32)
    model.load_state_dict(state)
    return model.eval()  # the recipe trains with frozen BatchNorm statistics (freeze_bn) and no dropout


def _global_batches(labels: list[int], epoch: int) -> list[list[int]]:
    sampler = PKSampler(labels, p=P, k=K, batches_per_epoch=BATCHES * WORLD, seed=0, num_replicas=1, rank=0)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_ranks_train_on_disjoint_shares_of_one_batch_sequence(ddp: Path) -> None:
    recs = _read(ddp, "fit")
    assert [r["rank"] for r in recs] == [0, 1] and all(r["world"] == WORLD for r in recs)
    labels = torch.load(ddp / "rec" / "step0-rank0.pt")["train_labels"]
    for epoch in (0, 1):
        per_rank = [[b["index"] for b in r["train"] if b["epoch"] == epoch] for r in recs]
        assert [len(b) for b in per_rank] == [BATCHES, BATCHES]  # the same count on every rank
        assert not {tuple(b) for b in per_rank[0]} & {tuple(b) for b in per_rank[1]}
        expected = _global_batches(labels, epoch)
        assert per_rank[0] == expected[0::WORLD] and per_rank[1] == expected[1::WORLD]


def test_gathered_loss_equals_the_single_process_loss_of_the_joint_batch(ddp: Path) -> None:
    steps = [torch.load(ddp / "rec" / f"step0-rank{r}.pt") for r in range(WORLD)]
    recs = _read(ddp, "fit")
    assert all(torch.equal(v, steps[1]["state"][k]) for k, v in steps[0]["state"].items())  # one model
    model = _model(steps[0]["state"])
    loss_fn, miner = MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5), MultiSimilarityMiner(epsilon=0.1)
    images = torch.cat([s["image"] for s in steps]).contiguous(memory_format=torch.channels_last)
    labels = torch.cat([s["label"] for s in steps])
    with torch.no_grad():
        emb = model(images)
        joint = float(loss_fn(emb, labels, miner(emb, labels)))
        local = float(loss_fn(emb[: P * K], labels[: P * K], miner(emb[: P * K], labels[: P * K])))
    ddp_losses = [r["train"][0]["loss"] for r in recs]
    assert ddp_losses[0] == pytest.approx(joint, abs=1e-5) and ddp_losses[1] == pytest.approx(joint, abs=1e-5)
    assert abs(local - joint) > 1e-4, "rank 0's own batch alone gives the same loss: the check would prove nothing"


def test_validation_metrics_cover_the_whole_val_split(ddp: Path) -> None:
    recs = _read(ddp, "fit")
    records = pd.read_pickle(ddp / "rec" / "val-records.pkl")
    last = [r["val"][-1] for r in recs]
    seen = [set(v["index"]) for v in last]
    assert seen[0] | seen[1] == set(range(len(records)))  # together the ranks embed the whole split ...
    assert all(len(s) < len(records) for s in seen)  # ... each only its share of it
    model = _model(torch.load(ddp / "rec" / "fit-rank0-val-state.pt"))
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
    labels = torch.load(ddp / "rec" / "step0-rank0.pt")["train_labels"]
    expected = _global_batches(labels, 2)
    for r in range(WORLD):
        assert fit[r]["end_step"] == 2 * BATCHES
        assert resumed[r]["start_epoch"] == 2 and resumed[r]["start_step"] == 2 * BATCHES
        assert {b["epoch"] for b in resumed[r]["train"]} == {2} and resumed[r]["end_step"] == 3 * BATCHES
        assert [b["index"] for b in resumed[r]["train"]] == expected[r::WORLD]
    assert resumed[0]["exported"] and resumed[1]["exported"] is None
