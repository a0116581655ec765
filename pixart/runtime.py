"""MindSpore set-up shared by the scripts: device, execution mode, compiler, precision, data parallelism.

The models compile their hot paths themselves (``pixart.runtime.jit``, ``ms.jit`` with the
options of ``--jit_level``), so the process runs in PyNative mode. Precision is named as on the
command line (``auto``, ``fp32``, ``fp16``, ``bf16``) and resolved here once: ``auto`` is fp16 on
Ascend and GPU (what the PixArt authors ran) and fp32 on CPU, whose MindSpore matmuls are fp32 only.
"""
from __future__ import annotations

import functools
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Tuple

from pixart.errors import ConfigError

STORAGE_DTYPES = ("fp32", "fp16", "bf16")  # what weights can be stored as
DTYPE_NAMES = ("auto", *STORAGE_DTYPES)  # what a run can compute in ("auto": the device's choice)
DEVICES = ("CPU", "GPU", "Ascend")
JIT_LEVELS = ("O0", "O1", "O2")
# ms.jit options of every compiled function, set once by setup_device from --jit_level
_JIT_OPTIONS = {"jit_level": "O0"}


def ms_dtype(name: str):
    """``fp32`` / ``fp16`` / ``bf16`` -> the MindSpore dtype."""
    import mindspore as ms

    table = {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}
    if name not in table:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {', '.join(STORAGE_DTYPES)}")
    return table[name]


def setup_device(device: Optional[str] = None, jit_level: str = "O0", max_device_memory: Optional[str] = None) -> str:
    """Select the MindSpore device (default: the installed backend), PyNative mode, the compiler's
    optimisation level and the device memory cap; returns the device target.

    jit_level: ``O0`` (MindSpore's default: kernel by kernel), ``O1`` (with operator fusion),
    ``O2`` (whole-graph sinking through the GE backend: Ascend only; deprecated by MindSpore 2.9).
    max_device_memory: e.g. ``58GB``, the most device memory MindSpore may take (its default is
    the whole device), passed to ``mindspore.runtime.set_memory``.

    MindSpore's compiler writes ``rank_0/om/analyze_fail.ir`` into the working folder when a graph
    fails to compile; its dumps go to the system's temporary folder instead."""
    import mindspore as ms

    os.environ.setdefault("MS_OM_PATH", os.path.join(tempfile.gettempdir(), "pixart-mindspore-ir"))
    if device:
        ms.set_device(device)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    target = ms.get_context("device_target")
    _JIT_OPTIONS.clear()
    _JIT_OPTIONS.update(jit_options(jit_level, target))
    if max_device_memory is not None:
        ms.runtime.set_memory(max_size=memory_size(max_device_memory))
    return target


def jit_options(level: str, device: str) -> dict:
    """The ``ms.jit`` keyword arguments of --jit_level ``level`` on ``device``."""
    if level not in JIT_LEVELS:
        raise ConfigError(f"unknown --jit_level {level!r}; choose one of {', '.join(JIT_LEVELS)}")
    if level == "O2":
        if device != "Ascend":
            raise ConfigError(f"--jit_level O2 (the GE backend) runs on Ascend only, not on {device}; use O0 or O1")
        return {"backend": "GE"}
    return {"jit_level": level}


def memory_size(text: str) -> str:
    """--max_device_memory as MindSpore takes it (``58GB``, ``512MB``); a ConfigError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([GM])B?\s*", str(text), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"--max_device_memory {text!r}: expected a size such as 58GB or 512MB")
    return f"{match.group(1)}{match.group(2).upper()}B"


@functools.lru_cache(maxsize=None)
def host_threads() -> ThreadPoolExecutor:
    """The process's pool of threads for NumPy work on tensors' host memory (one per core, at most 8)."""
    return ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="pixart-host")


def jit(fn):
    """``ms.jit(fn)`` with the compiler options chosen by ``setup_device``."""
    import mindspore as ms

    return ms.jit(fn, **_JIT_OPTIONS)


def compute_dtype(name: str, device: str):
    """The compute dtype ``name`` on ``device`` (``auto``: fp32 on CPU, fp16 on Ascend and GPU);
    a ConfigError where the device cannot compute in it."""
    if name == "auto":
        name = "fp32" if device == "CPU" else "fp16"
    if device == "CPU" and name != "fp32":
        raise ConfigError(f"--dtype {name} is not supported on CPU (MindSpore's CPU matmuls are fp32); use --dtype fp32")
    return ms_dtype(name)


def text_encoder_dtype(device: str, dtype):
    """T5 runs in fp32 on CPU whatever the transformer's dtype (no half-precision CPU matmuls)."""
    import mindspore as ms

    return ms.float32 if device == "CPU" else dtype


def init_data_parallel() -> Tuple[int, int]:
    """Join the msrun communication group in data-parallel mode; returns (rank, world size)."""
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    init()
    world = get_group_size()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True, device_num=world)
    return get_rank(), world
