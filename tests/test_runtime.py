"""The runtime resolver (deepfeat.finetune.inference.runtime): device, workers, precision, and glibc malloc tuning."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from deepfeat.finetune.errors import DataError
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
        with pytest.raises(DataError, match="no usable CUDA GPU"):
            resolve_device("cuda")


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
