"""Training checkpoints: written atomically, the last K kept, resumable exactly.

    <output>/checkpoints/step-00001000/
        model.ckpt      transformer weights + architecture (sample.py loads it directly)
        ema.ckpt        EMA weights, same format (sample.py loads it too)
        optimizer.ckpt  optimizer state (moments, step count), as MindSpore parameters
        state.json      step, data position, loss scale, seed, run settings

A checkpoint is first written to ``step-XXXXXXXX.partial`` and renamed when complete, so a
run killed mid-save leaves the previous checkpoint as the latest one. All training
randomness is derived from (seed, step), so step + weights + optimizer state is the
whole state of a run.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Dict, Optional

import numpy as np

from pixart.models.pixart import PixArtConfig
from pixart.models.pixart_checkpoint import save_mindspore_checkpoint

_STEP_DIR = re.compile(r"step-(\d{8})$")


def checkpoint_root(output_path: str) -> str:
    return os.path.join(output_path, "checkpoints")


def list_checkpoints(output_path: str) -> Dict[int, str]:
    """Complete checkpoints under ``output_path``: {step: folder}."""
    root = checkpoint_root(output_path)
    if not os.path.isdir(root):
        return {}
    found = {}
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, "state.json")):
            found[int(m.group(1))] = os.path.join(root, name)
    return dict(sorted(found.items()))


def resolve_resume(resume: str, output_path: str) -> Optional[str]:
    """``latest`` -> newest complete checkpoint folder of this run (None if there is none yet);
    otherwise the given folder, which must hold a complete checkpoint."""
    if resume == "latest":
        found = list_checkpoints(output_path)
        return found[max(found)] if found else None
    if not os.path.isfile(os.path.join(resume, "state.json")):
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no state.json); "
                                f"use 'latest' or a {checkpoint_root(output_path)}/step-XXXXXXXX folder")
    return resume


def save_checkpoint(output_path: str, step: int, config: PixArtConfig, weights: Dict[str, np.ndarray],
                    ema_weights: Optional[Dict[str, np.ndarray]], optimizer_state: Dict[str, np.ndarray],
                    state: dict, keep_last: int = 3) -> str:
    """Write one checkpoint atomically and delete all but the newest ``keep_last``."""
    import mindspore as ms

    root = checkpoint_root(output_path)
    final = os.path.join(root, f"step-{step:08d}")
    partial = final + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    save_mindspore_checkpoint(weights, config, os.path.join(partial, "model.ckpt"))
    if ema_weights is not None:
        save_mindspore_checkpoint(ema_weights, config, os.path.join(partial, "ema.ckpt"))
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in optimizer_state.items()],
                       os.path.join(partial, "optimizer.ckpt"))
    with open(os.path.join(partial, "state.json"), "w") as f:
        json.dump({**state, "step": step}, f, indent=2)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    if keep_last > 0:
        for old_step, folder in list(list_checkpoints(output_path).items())[:-keep_last]:
            shutil.rmtree(folder, ignore_errors=True)
    return final


def load_checkpoint(folder: str) -> dict:
    """{"weights", "ema" (or None), "optimizer", "state"} of a checkpoint folder, as NumPy arrays."""
    from pixart.models.pixart_checkpoint import read_mindspore_checkpoint
    from pixart.utils.mindspore_ckpt import read_ckpt

    weights, _ = read_mindspore_checkpoint(os.path.join(folder, "model.ckpt"))
    ema_path = os.path.join(folder, "ema.ckpt")
    ema = read_mindspore_checkpoint(ema_path)[0] if os.path.isfile(ema_path) else None
    optimizer = read_ckpt(os.path.join(folder, "optimizer.ckpt"))
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    return {"weights": weights, "ema": ema, "optimizer": optimizer, "state": state}
