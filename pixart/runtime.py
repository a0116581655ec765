"""MindSpore set-up shared by the scripts: device, execution mode, precision, data parallelism.

The models compile their hot paths themselves (``ms.jit``), so the process runs in PyNative
mode. Precision is named as on the command line (``fp32``, ``fp16``, ``bf16``) and resolved
here once; MindSpore's CPU kernels compute matmuls in fp32 only.
"""
from __future__ import annotations

import os
import tempfile
from typing import Optional, Tuple

from pixart.errors import ConfigError

DTYPE_NAMES = ("fp32", "fp16", "bf16")
DEVICES = ("CPU", "GPU", "Ascend")


def ms_dtype(name: str):
    """``fp32`` / ``fp16`` / ``bf16`` -> the MindSpore dtype."""
    import mindspore as ms

    table = {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}
    if name not in table:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_NAMES)}")
    return table[name]


def setup_device(device: Optional[str] = None) -> str:
    """Select the MindSpore device (default: the installed backend), PyNative mode; returns the target.

    MindSpore's compiler writes ``rank_0/om/analyze_fail.ir`` into the working folder when a graph
    fails to compile; its dumps go to the system's temporary folder instead."""
    import mindspore as ms

    os.environ.setdefault("MS_OM_PATH", os.path.join(tempfile.gettempdir(), "pixart-mindspore-ir"))
    if device:
        ms.set_device(device)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    return ms.get_context("device_target")


def compute_dtype(name: str, device: str):
    """The compute dtype ``name`` on ``device``; a ConfigError where the device cannot compute in it."""
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
