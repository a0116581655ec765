"""Load a Hugging Face model folder (``config.json`` + safetensors weights) into a MindSpore cell.

The cells in ``pixart.models`` name their parameters exactly as the checkpoints name their
tensors, so loading is a by-name copy. Every problem a user can cause (wrong folder, missing
shard, a config.json that does not describe the weights) surfaces as one ``ModelLoadError``
whose message names the folder and says what was expected.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from pixart.errors import ModelLoadError
from pixart.utils.mindspore_ckpt import NUMPY_DTYPES
from pixart.utils.safetensors_io import SafetensorsError, iter_sharded_folder


def read_folder_config(folder: str, what: str) -> dict:
    """Return ``folder/config.json`` as a dict; ``what`` names the model in error messages."""
    if not os.path.isdir(folder):
        raise ModelLoadError(f"{what}: folder {folder!r} does not exist")
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ModelLoadError(f"{what}: {folder!r} has no config.json; expected a Hugging Face folder "
                             f"with config.json and safetensors weights")
    try:
        with open(path) as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{what}: {path} holds a {type(config).__name__}, expected a JSON object")
    return config


def load_folder_weights(cell: nn.Cell, folder: str, weights_name: str,
                 rename: Optional[Callable[[str], Optional[str]]] = None) -> None:
    """Copy every tensor of the folder's weights into the parameter of the same name.

    Shards are read one at a time and each tensor is converted to its parameter's dtype, so
    peak host memory is the model plus one shard. ``rename`` maps a checkpoint name to a
    parameter name, or to None for tensors to skip. Raises ``ModelLoadError`` on a missing
    file, a shape mismatch, and on missing or unexpected tensors.
    """
    params = dict(cell.parameters_and_names())
    loaded, unexpected = set(), []
    try:
        for shard in iter_sharded_folder(folder, weights_name):
            for name in list(shard):
                array = shard.pop(name)
                target = rename(name) if rename else name
                if target is None:
                    continue
                param = params.get(target)
                if param is None:
                    unexpected.append(name)
                    continue
                if tuple(array.shape) != tuple(param.shape):
                    raise ModelLoadError(
                        f"{folder}: tensor {name!r} has shape {tuple(array.shape)} in the weights but "
                        f"{tuple(param.shape)} in the model built from config.json; the config does not "
                        f"describe these weights")
                param.set_data(_as_tensor(array, param.dtype))
                loaded.add(target)
    except SafetensorsError as e:
        raise ModelLoadError(f"cannot read the weights: {e}") from None
    missing = sorted(set(params) - loaded)
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) the config.json model needs ({_first(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} tensor(s) the model does not have ({_first(sorted(unexpected))})")
        raise ModelLoadError(f"{folder}: the weights do not match config.json: " + "; ".join(parts))


def _as_tensor(array: np.ndarray, dtype) -> Tensor:
    if dtype == ms.bfloat16:  # NumPy has no bf16: convert through an fp32 tensor
        return Tensor(array.astype(np.float32, copy=False)).astype(ms.bfloat16)
    array = np.ascontiguousarray(array.astype(NUMPY_DTYPES[str(dtype)], copy=False))
    return Tensor.from_numpy(array)  # shares the buffer: no second copy of the weights


def _first(names, n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", ... and {len(names) - n} more" if len(names) > n else "")
