"""glibc malloc tuning for CPU training and embedding (deepfeat.finetune.inference.runtime)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from deepfeat.finetune.inference.runtime import ENV, _libc

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


@pytest.mark.skipif(_libc() is None, reason="glibc only")
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
