"""The runtime resolver (deepfeat.finetune.inference.runtime): device, workers, precision, and glibc malloc tuning;
and the rule applied at each site that decides them (embed, Ray's actors, the CLI's embed and evaluate)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from support.imagegen import make_image_folder

from deepfeat.finetune.data.readers import read_image_folder, read_records
from deepfeat.finetune.data.writer import write_manifest
from deepfeat.finetune.errors import DataError
from deepfeat.finetune.inference.distributed import BundleEmbedder
from deepfeat.finetune.inference.embed import iter_embeddings
from deepfeat.finetune.inference.runtime import (
    DEVICE_ENV,
    ENV,
    PRECISION_ENV,
    WORKERS_ENV,
    Runtime,
    auto_num_workers,
    glibc,
    resolve_device,
    resolve_num_workers,
    resolve_precision,
    resolve_runtime,
)
from deepfeat.finetune.inference.shards import read_shards
from deepfeat.finetune.models.bundle import ModelBundle
from deepfeat.recipes.cli import main
from deepfeat.recipes.cli.arguments import resolve_device as cli_resolve_device

# A child process: tune (or not), then allocate and touch a 256 MiB tensor, free it, and report the RSS
# around the free. With glibc's defaults a block this big is its own mmap and goes back to the kernel on
# free; with the tuning it stays in the heap for the next step's tensors.
_CHILD = """
import json, sys, torch
from deepfeat.finetune.inference.runtime import tune_cpu_allocator

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024

applied = tune_cpu_allocator()
again = tune_cpu_allocator()
x = torch.ones(64 << 20)  # 256 MiB of float32, every page touched
before = rss_mib()
del x
after = rss_mib()
print(json.dumps({"applied": applied, "again": again, "freed_mib": before - after}))
"""


def _child(env_value: str | None) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "LD_PRELOAD")}
    if env_value is not None:
        env[ENV] = env_value
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(glibc() is None, reason="glibc only")
def test_tuning_keeps_freed_blocks_for_reuse() -> None:
    tuned = _child(None)
    assert tuned["applied"] is True and tuned["again"] is True
    assert tuned["freed_mib"] < 32, tuned  # the 256 MiB block stayed in the process

    default = _child("0")
    assert default["applied"] is False and default["again"] is False
    assert default["freed_mib"] > 200, default  # glibc's default: unmapped on free


def test_other_allocator_in_ld_preload_is_left_in_charge(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepfeat.finetune.inference import runtime

    monkeypatch.setattr(runtime, "_state", {})
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    assert runtime.tune_cpu_allocator() is False


# --------------------------------------------------------------------------------------------------
# the one resolver: explicit argument > environment > model > default


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (DEVICE_ENV, WORKERS_ENV, PRECISION_ENV):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_device_precedence(clean_env: pytest.MonkeyPatch) -> None:
    default = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = torch.nn.Linear(2, 2).to("meta")  # a model that already lives somewhere
    assert resolve_device() == default and resolve_device("auto") == default
    assert resolve_device(model=model) == torch.device("meta")
    clean_env.setenv(DEVICE_ENV, "cpu")
    assert resolve_device(model=model) == torch.device("cpu")  # the environment beats the model
    assert resolve_device("meta") == torch.device("meta")  # the argument beats the environment
    clean_env.setenv(DEVICE_ENV, "auto")
    assert resolve_device(model=model) == torch.device("meta")  # "auto" counts as not set
    clean_env.setenv(DEVICE_ENV, "gpu9")
    with pytest.raises(DataError, match=r"\$DEEPFEAT_DEVICE names the device 'gpu9'"):
        resolve_device()
    if not torch.cuda.is_available():
        with pytest.raises(DataError, match=r"asks for 'cuda', but no CUDA device is available .* device='cpu'"):
            resolve_device("cuda")
    clean_env.setenv(DEVICE_ENV, "cuda:99")  # a GPU no machine here has, with or without CUDA
    with pytest.raises(DataError, match=r"\$DEEPFEAT_DEVICE asks for 'cuda:99'.*DEEPFEAT_DEVICE=cpu"):
        resolve_device(model=model)  # the environment is checked before the model is asked


def test_workers_and_precision_precedence(clean_env: pytest.MonkeyPatch) -> None:
    assert resolve_num_workers(device="cpu", cores=2) == auto_num_workers("cpu", 2) == 0
    assert auto_num_workers("cpu", 16) == 4 and auto_num_workers("cuda", 16) == 8
    clean_env.setenv(WORKERS_ENV, "3")
    assert resolve_num_workers(device="cpu", cores=2) == 3 and resolve_num_workers(1) == 1
    assert resolve_num_workers("auto", device="cpu", cores=2) == 3
    clean_env.setenv(WORKERS_ENV, "-1")
    with pytest.raises(DataError, match=r"\$DEEPFEAT_NUM_WORKERS must be 0 or more, got -1"):
        resolve_num_workers()
    assert resolve_precision(device="cpu") is False and resolve_precision(device="cuda") is True
    clean_env.setenv(PRECISION_ENV, "fp32")
    assert resolve_precision(device="cuda") is False and resolve_precision("bf16", device="cuda") is True
    assert resolve_precision(True, device="cuda") is True
    clean_env.setenv(PRECISION_ENV, "fp16")
    with pytest.raises(DataError, match=r"\$DEEPFEAT_PRECISION must be one of \['auto', 'fp32', 'bf16'\]"):
        resolve_precision(device="cpu")
    clean_env.delenv(PRECISION_ENV)
    clean_env.setenv(ENV, "0")
    rt = resolve_runtime("cpu", 0, "fp32")
    assert rt == Runtime(torch.device("cpu"), 0, False, rt.allocator_tuned)


# --------------------------------------------------------------------------------------------------
# the rule at each site


def _vectors(bundle: ModelBundle, records: pd.DataFrame, **kw: object) -> np.ndarray:
    return np.concatenate([v for _, v in iter_embeddings(bundle, records, batch_size=8, **kw)])  # type: ignore[arg-type]


def test_embed_follows_the_rule(clean_env: pytest.MonkeyPatch, rel_bundle: ModelBundle, tiny_image_folder: Path,
                                caplog: pytest.LogCaptureFixture) -> None:
    records = read_records(tiny_image_folder).head(8)
    caplog.set_level(logging.INFO, logger="deepfeat.finetune.inference.embed")
    fp32 = _vectors(rel_bundle, records, num_workers=0)
    # precision: $DEEPFEAT_PRECISION when no argument is given, the argument over it
    clean_env.setenv(PRECISION_ENV, "bf16")
    caplog.clear()
    bf16 = _vectors(rel_bundle, records, num_workers=0)
    assert "bf16 autocast" in caplog.text
    assert not np.array_equal(bf16, fp32) and np.allclose(bf16, fp32, atol=0.05)  # bf16 numerics, same vectors
    assert np.array_equal(_vectors(rel_bundle, records, num_workers=0, autocast="fp32"), fp32)
    assert np.array_equal(_vectors(rel_bundle, records, num_workers=0, autocast=False), fp32)
    clean_env.delenv(PRECISION_ENV)
    # workers: $DEEPFEAT_NUM_WORKERS when no argument is given (a worker process decodes: same vectors)
    clean_env.setenv(WORKERS_ENV, "1")
    caplog.clear()
    assert np.array_equal(_vectors(rel_bundle, records), fp32)
    assert "with 1 DataLoader worker(s), float32" in caplog.text
    caplog.clear()
    _vectors(rel_bundle, records, num_workers=0)
    assert "with 0 DataLoader worker(s)" in caplog.text
    # device: $DEEPFEAT_DEVICE over where the bundle's model is, the argument over both
    clean_env.setenv(DEVICE_ENV, "cuda:99")
    with pytest.raises(DataError, match=r"\$DEEPFEAT_DEVICE asks for 'cuda:99'"):
        _vectors(rel_bundle, records)
    assert np.array_equal(_vectors(rel_bundle, records, device="cpu", num_workers=0), fp32)


def test_ray_actor_precision_follows_the_rule(clean_env: pytest.MonkeyPatch, rel_bundle: ModelBundle) -> None:
    threads = torch.get_num_threads()  # a CPU actor sets the process's torch threads
    try:
        assert BundleEmbedder(rel_bundle, "cpu", None, threads, 1).autocast is False  # float32 on a CPU
        clean_env.setenv(PRECISION_ENV, "bf16")
        assert BundleEmbedder(rel_bundle, "cpu", None, threads, 1).autocast is True
        assert BundleEmbedder(rel_bundle, "cpu", "auto", threads, 1).autocast is True
        assert BundleEmbedder(rel_bundle, "cpu", "fp32", threads, 1).autocast is False
        assert BundleEmbedder(rel_bundle, "cpu", False, threads, 1).autocast is False
    finally:
        torch.set_num_threads(threads)


def test_cli_device_follows_the_rule(clean_env: pytest.MonkeyPatch) -> None:
    assert cli_resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    clean_env.setenv(DEVICE_ENV, "cpu")
    assert cli_resolve_device("auto") == "cpu"
    clean_env.setenv(DEVICE_ENV, "cuda:99")
    assert cli_resolve_device("cpu") == "cpu"  # --device over the environment
    with pytest.raises(DataError, match=r"\$DEEPFEAT_DEVICE asks for 'cuda:99'"):
        cli_resolve_device("auto")
    clean_env.delenv(DEVICE_ENV)
    with pytest.raises(DataError, match=r"--device asks for 'cuda:99', .*; use (cuda:0 or )?--device cpu"):
        cli_resolve_device("cuda:99")


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("deepfeat: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_cli_embed_follows_the_rule(clean_env: pytest.MonkeyPatch, rel_bundle_dir: Path, tiny_image_folder: Path,
                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["embed", "--bundle", str(rel_bundle_dir), "--data", str(tiny_image_folder), "--limit", "6", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "fp32"), "--num-workers", "0"]) == 0
    fp32 = read_shards(tmp_path / "fp32")[1]
    clean_env.setenv(PRECISION_ENV, "bf16")  # --precision auto: the environment's choice
    assert main([*common, "--out", str(tmp_path / "bf16"), "--num-workers", "0"]) == 0
    assert not np.array_equal(read_shards(tmp_path / "bf16")[1], fp32)
    assert main([*common, "--out", str(tmp_path / "fp32b"), "--num-workers", "0", "--precision", "fp32"]) == 0
    assert np.array_equal(read_shards(tmp_path / "fp32b")[1], fp32)
    clean_env.delenv(PRECISION_ENV)
    capsys.readouterr()
    clean_env.setenv(WORKERS_ENV, "-1")  # --num-workers auto: the environment's count, checked
    assert main([*common, "--out", str(tmp_path / "w")]) == 2
    assert "$DEEPFEAT_NUM_WORKERS must be 0 or more, got -1" in _error_line(capsys.readouterr().err)
    clean_env.delenv(WORKERS_ENV)
    clean_env.setenv(DEVICE_ENV, "cuda:99")  # --device auto: the environment's device, checked before any work
    assert main([*common, "--out", str(tmp_path / "d"), "--num-workers", "0"]) == 2
    assert "$DEEPFEAT_DEVICE asks for 'cuda:99'" in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "d").exists() and not (tmp_path / "w").exists()
    assert main([*common, "--out", str(tmp_path / "cpu"), "--num-workers", "0", "--device", "cpu"]) == 0
    assert np.array_equal(read_shards(tmp_path / "cpu")[1], fp32)


def test_cli_evaluate_workers_follow_the_rule(clean_env: pytest.MonkeyPatch, rel_bundle_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_image_folder(tmp_path / "imgs", n_classes=2, per_class=3, size=32)
    manifest = write_manifest(read_image_folder(folder).assign(split="test").drop(columns=["is_query", "is_gallery"]),
                              tmp_path / "test.csv")
    common = ["evaluate", "--config", "fashion", "--bundle", str(rel_bundle_dir), "--data", str(manifest),
              "--split-mode", "as_is", "--limit-per-class", "0", "--baseline-weights", "none"]
    clean_env.setenv(WORKERS_ENV, "-1")  # --num-workers auto (the default): the environment's count, checked
    assert main(common) == 2
    assert "$DEEPFEAT_NUM_WORKERS must be 0 or more, got -1" in _error_line(capsys.readouterr().err)
    assert main([*common, "--num-workers", "0"]) == 0  # the argument over the environment


def test_cli_sync_and_layers_workers_follow_the_rule(clean_env: pytest.MonkeyPatch, rel_bundle_dir: Path,
                                                     tiny_image_folder: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # --num-workers auto (the default) reads $DEEPFEAT_NUM_WORKERS: a bad count is refused before any work
    clean_env.setenv(WORKERS_ENV, "-1")
    db = tmp_path / "milvus.db"
    sync = ["sync", str(tiny_image_folder), "--bundle", str(rel_bundle_dir), "--collection", "c", "--uri", str(db),
            "--no-progress"]
    assert main(sync) == 2
    assert "$DEEPFEAT_NUM_WORKERS must be 0 or more, got -1" in _error_line(capsys.readouterr().err)
    layers = ["layers", "--data", str(tiny_image_folder), "--out", str(tmp_path / "layers"), "--weights", "none",
              "--image-size", "32"]
    assert main(layers) == 2
    assert "$DEEPFEAT_NUM_WORKERS must be 0 or more, got -1" in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "layers").exists()
    # the argument wins over the environment (the bad count is not even read)
    assert main([*sync, "--num-workers", "0"]) == 0
