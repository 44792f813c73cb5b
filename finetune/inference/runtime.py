"""The one runtime resolver: device, DataLoader workers, precision and the CPU allocator.

Every knob is decided by one precedence rule, as timm's ``resolve_data_config`` does for preprocessing:
**an explicit argument > the environment > the model (or bundle) > the default**. ``None`` and ``"auto"``
count as "not given". The environment variables are ``DEEPFEAT_DEVICE`` (``cpu``, ``cuda``, ``cuda:1``,
``mps``), ``DEEPFEAT_NUM_WORKERS`` (a count or ``auto``), ``DEEPFEAT_PRECISION`` (``fp32``, ``bf16``,
``auto``) and ``DEEPFEAT_MALLOC_TUNING`` (``0`` turns the allocator tuning off). Only the device has a model
level (where its parameters already are); the defaults are CUDA when available, a worker count for the
device (:func:`auto_num_workers`), bf16 autocast on CUDA only, and the allocator tuned.

The allocator: glibc's malloc thresholds.

By default glibc serves every allocation of 128 KiB or more (the threshold then grows with what is
freed, up to 32 MiB) with a fresh ``mmap`` and returns it to the kernel on ``free``, and trims the top of
its heap whenever 128 KiB or more of it is free. A training step of a convolutional network allocates
and frees the same few hundred activation tensors of tens of MiB every step, so every step page-faults
them in again and zero-fills them in the kernel: on 2 CPU cores that was about a third of the step of
EfficientNet-Lite0 at 64 px (batch 120: about 560 ms per step by default, about 380 ms with the blocks
kept; peak RSS unchanged, 1.80 against 1.82 GB). PyTorch's CPU performance guides reach the same end
with jemalloc or tcmalloc (``LD_PRELOAD``); this does it with the C library already loaded, from inside
the process, through ``mallopt``.

The cost: memory freed by the process stays in it for reuse instead of going back to the kernel, so a
long-lived process keeps its peak. ``DEEPFEAT_MALLOC_TUNING=0`` (or ``off``/``false``/``no``) turns the
tuning off; it is also skipped where the C library is not glibc, and where ``LD_PRELOAD`` names
another allocator (that one is in charge then).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from deepfeat.finetune.errors import DataError

log = logging.getLogger(__name__)

DEVICE_ENV = "DEEPFEAT_DEVICE"
WORKERS_ENV = "DEEPFEAT_NUM_WORKERS"
PRECISION_ENV = "DEEPFEAT_PRECISION"
Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
ENV = "DEEPFEAT_MALLOC_TUNING"
M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # allocations below 1 GiB come from the heap and are reused
FALLBACK_MMAP_THRESHOLD = 32 << 20  # the most some glibc versions accept (HEAP_MAX_SIZE / 2 on 64-bit)
_OFF = {"0", "off", "false", "no"}
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_state: dict[str, bool] = {}


def glibc() -> ctypes.CDLL | None:
    """glibc, where this process runs on it (``None`` on other C libraries and systems)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl does not)
    except (OSError, AttributeError):
        return None
    return libc


def tune_cpu_allocator() -> bool:
    """Keep freed blocks in the process for reuse (see the module docstring); once per process.

    Returns whether the tuning is in effect. Called by ``MetricLearningModule`` when a fit starts and by
    the embedding functions; calling it again is free.
    """
    if "applied" in _state:
        return _state["applied"]
    applied = False
    preload = os.environ.get("LD_PRELOAD", "")
    if os.environ.get(ENV, "").strip().lower() in _OFF:
        log.debug("malloc tuning off (%s=%s)", ENV, os.environ[ENV])
    elif any(name in preload for name in _OTHER_ALLOCATORS):
        log.debug("malloc tuning skipped: LD_PRELOAD names another allocator (%s)", preload)
    elif (libc := glibc()) is not None:
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        threshold = MMAP_THRESHOLD if libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) else (
            FALLBACK_MMAP_THRESHOLD if libc.mallopt(M_MMAP_THRESHOLD, FALLBACK_MMAP_THRESHOLD) else 0)
        # -1 turns trimming off: the heap's free top stays mapped for the next step's tensors
        applied = bool(threshold) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))
        if applied:
            log.info("glibc malloc: blocks under %d MiB are kept for reuse instead of being returned to the "
                     "kernel (faster CPU steps; %s=0 turns this off)", threshold >> 20, ENV)
    _state["applied"] = applied
    return applied


# --------------------------------------------------------------------------------------------------
# device, workers, precision


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return None if value.lower() in ("", "auto") else value


def _device(name: str, source: str, cpu_fix: str) -> torch.device:
    """``name`` as a device this machine has (``source``: where the name came from; ``cpu_fix``: how to ask for cpu)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DataError(f"{source} names the device {name!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"{source} asks for {name!r}, but no CUDA device is available here "
                        f"(torch.cuda.is_available() is False); use {cpu_fix}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DataError(f"{source} asks for {name!r}, but this machine has {torch.cuda.device_count()} CUDA "
                        f"device(s), numbered from 0; use cuda:0 or {cpu_fix}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DataError(f"{source} asks for 'mps', but the Apple MPS backend is not available here; use {cpu_fix}")
    return device


def resolve_device(device: str | torch.device | None = None, *, model: torch.nn.Module | None = None,
                   flag: str | None = None) -> torch.device:
    """Where to run: ``device`` > ``$DEEPFEAT_DEVICE`` > where ``model``'s parameters are > CUDA when available.

    ``flag`` is the command-line option that gave ``device`` (``"--device"``), for the error messages.

    Raises:
        DataError: an unknown device name, or a CUDA (or MPS) device this machine does not have.
    """
    if isinstance(device, torch.device):
        return device
    if device is not None and device.strip().lower() != "auto":
        source, fix = (flag, f"{flag} cpu") if flag else ("the device argument", "device='cpu'")
        return _device(device.strip().lower(), source, fix)
    if (name := _env(DEVICE_ENV)) is not None:
        return _device(name.lower(), f"${DEVICE_ENV}", f"{DEVICE_ENV}=cpu (or unset it)")
    if model is not None:
        first = next(model.parameters(), None)
        if first is not None:
            return first.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def auto_num_workers(device: torch.device | str, cores: int | None = None) -> int:
    """The default DataLoader worker count for ``device``.

    On CUDA the workers feed the GPU: up to 8, leaving a core to the main process. On a CPU the model
    already uses every core through OpenMP, and a worker process that takes one makes the model's
    threads wait for it: on 2 cores no worker at all was measured fastest (0.78x the model-only rate,
    against 0.55x with one worker; benchmarks/README.md). With more cores, a few workers are worth
    their cores.
    """
    n = cores if cores is not None else (os.cpu_count() or 1)
    if torch.device(device).type == "cuda":
        return max(1, min(8, n - 1))
    return 0 if n <= 2 else min(4, n // 4)


def _workers(value: str, source: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise DataError(f"{source} must be a worker count (0 or more) or auto, got {value!r}") from None
    if n < 0:
        raise DataError(f"{source} must be 0 or more, got {n}")
    return n


def resolve_num_workers(num_workers: int | str | None = None, *, device: torch.device | str = "cpu",
                        cores: int | None = None) -> int:
    """DataLoader workers: ``num_workers`` > ``$DEEPFEAT_NUM_WORKERS`` > :func:`auto_num_workers` for ``device``.

    Raises:
        DataError: a negative or non-numeric count.
    """
    if isinstance(num_workers, int) and not isinstance(num_workers, bool):
        return _workers(str(num_workers), "num_workers")
    if num_workers is not None and str(num_workers).strip().lower() != "auto":
        return _workers(str(num_workers).strip(), "num_workers")
    if (value := _env(WORKERS_ENV)) is not None:
        return _workers(value, f"${WORKERS_ENV}")
    return auto_num_workers(device, cores)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matrix and convolution kernels natively (AVX512-BF16 or AMX via oneDNN).

    Where it does, bf16 autocast makes CPU inference about 2-4x faster; where it does not, bf16 is
    emulated and slower than float32.
    """
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: Precision | bool | None = None, *, device: torch.device | str = "cpu") -> bool:
    """Whether to run under bf16 autocast: ``precision`` (``"bf16"``/``True``, ``"fp32"``/``False``) >
    ``$DEEPFEAT_PRECISION`` > bf16 on CUDA, float32 elsewhere (float32 stays exact on a CPU).

    Raises:
        DataError: a precision other than auto, fp32 or bf16.
    """
    if isinstance(precision, bool):
        chosen: str | None = "bf16" if precision else "fp32"
        source = "precision"
    else:
        chosen = None if precision in (None, "auto") else str(precision)
        source = "precision"
        if chosen is None and (chosen := _env(PRECISION_ENV)) is not None:
            source = f"${PRECISION_ENV}"
    if chosen is not None and chosen not in PRECISIONS:
        raise DataError(f"{source} must be one of {list(PRECISIONS)}, got {chosen!r}")
    dev = torch.device(device)
    if chosen is None or chosen == "auto":
        return dev.type == "cuda"
    if chosen == "bf16" and dev.type == "cpu" and not cpu_has_native_bf16():
        log.warning("bf16 autocast requested on a CPU without native bf16 (AVX512-BF16/AMX): it is emulated "
                    "and slower than float32; leave it off on this machine")
    return chosen == "bf16"


@dataclass(frozen=True)
class Runtime:
    """What :func:`resolve_runtime` decided."""

    device: torch.device
    num_workers: int
    autocast: bool
    allocator_tuned: bool


def resolve_runtime(device: str | torch.device | None = None, num_workers: int | str | None = None,
                    precision: Precision | bool | None = None, *, model: torch.nn.Module | None = None,
                    tune_allocator: bool = True) -> Runtime:
    """Device, workers and precision by the one precedence rule (module docstring), and the CPU allocator
    tuned (:func:`tune_cpu_allocator`) unless ``tune_allocator`` is False or the environment turns it off.

    Raises:
        DataError: an unknown device or precision, a CUDA device this machine lacks, a bad worker count.
    """
    dev = resolve_device(device, model=model)
    return Runtime(
        device=dev,
        num_workers=resolve_num_workers(num_workers, device=dev),
        autocast=resolve_precision(precision, device=dev),
        allocator_tuned=tune_cpu_allocator() if tune_allocator else False,
    )


__all__ = [
    "DEVICE_ENV",
    "ENV",
    "PRECISIONS",
    "PRECISION_ENV",
    "WORKERS_ENV",
    "Precision",
    "Runtime",
    "auto_num_workers",
    "cpu_has_native_bf16",
    "glibc",
    "resolve_device",
    "resolve_num_workers",
    "resolve_precision",
    "resolve_runtime",
    "tune_cpu_allocator",
]
