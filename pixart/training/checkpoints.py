"""Training checkpoints: written atomically, the last K kept, resumable exactly, one run per folder.

    <output>/checkpoints/step-00001000/
        model.ckpt      transformer weights + architecture (sample.py loads it directly)
        ema.ckpt        EMA weights, same format (sample.py loads it too)
        adapter/        instead of the two above when training a LoRA: the adapter as a PEFT
        adapter_ema/    folder (sample.py --lora_path), and its EMA
        controlnet.ckpt instead when training a ControlNet: the branch (sample.py --controlnet),
        controlnet_ema.ckpt and its EMA
        optimizer.ckpt  optimizer state (moments, step count), as MindSpore parameters
        state.json      step, loss scale, seed, world size, and the run's configuration

A checkpoint is first written to ``step-XXXXXXXX.partial`` and renamed when complete, so a
run killed mid-save leaves the previous checkpoint as the latest one. Old checkpoints are
renamed to ``.deleting`` before they are removed, so a folder named ``step-XXXXXXXX`` is
always complete. All training randomness is derived from (seed, step), so step + weights +
optimizer state is the whole state of a run.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Callable, Dict, List, Optional

import numpy as np

from pixart.errors import OutputError, PixArtError, TrainingError
from pixart.models.pixart import PixArtConfig
from pixart.models.pixart_checkpoint import save_mindspore_checkpoint
from pixart.utils.mindspore_ckpt import write_ckpt

logger = logging.getLogger("pixart.train")

_STEP_DIR = re.compile(r"step-(\d{8})$")
_LEFTOVER = re.compile(r"step-\d{8}\.(partial|deleting)$")
RUN_LOGS = ("train_log.csv", "tensorboard")

# settings that change what a run computes; the others (how long, how often to log or save)
# may differ between a run and its continuation without a warning
_UNCOMPARED = {"resume", "overwrite", "max_steps", "epochs", "ckpt_every", "keep_last", "log_every", "tensorboard",
               "progress", "num_workers", "validation_every", "validation_prompts", "validation_steps", "output_path"}


def checkpoint_root(output_path: str) -> str:
    return os.path.join(output_path, "checkpoints")


def list_checkpoints(output_path: str) -> Dict[int, str]:
    """Checkpoints under ``output_path``, oldest first: {step: folder}."""
    root = checkpoint_root(output_path)
    if not os.path.isdir(root):
        return {}
    found = {}
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, "state.json")):
            found[int(m.group(1))] = os.path.join(root, name)
    return dict(sorted(found.items()))


def remove_leftovers(output_path: str) -> None:
    """Delete what a killed run left half-written (``.partial``) or half-deleted (``.deleting``)."""
    root = checkpoint_root(output_path)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if _LEFTOVER.match(name):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _remove_folder(folder: str) -> None:
    """Rename first, then delete: a kill half-way leaves a ``.deleting`` folder, never a checkpoint
    folder missing some of its files."""
    doomed = folder + ".deleting"
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prepare_output(output_path: str, resume: Optional[str], overwrite: bool, delete: bool = True) -> None:
    """Make sure a fresh run does not mix with another run already in ``output_path``: refuse
    unless resuming or told to overwrite (then the other run's checkpoints and logs go; only
    where ``delete``, i.e. on one rank of a multi-process run)."""
    if not delete:
        if not resume and list_checkpoints(output_path) and not overwrite:
            raise TrainingError(f"{output_path} already holds a training run")
        return
    remove_leftovers(output_path)
    found = list_checkpoints(output_path)
    if resume or not found:
        return
    if not overwrite:
        raise TrainingError(f"{output_path} already holds a training run (checkpoints up to step {max(found)}). "
                            f"Continue it with --resume latest, choose another --output_path, or pass --overwrite "
                            f"to delete its checkpoints and logs and start over")
    logger.info("--overwrite: deleting the previous run in %s (checkpoints up to step %d)", output_path, max(found))
    for folder in found.values():
        _remove_folder(folder)
    for name in RUN_LOGS:
        path = os.path.join(output_path, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def resume_candidates(resume: str, output_path: str) -> List[str]:
    """The checkpoint folders to try, in order: for ``latest`` every checkpoint of the run, newest
    first (empty: nothing to resume yet); otherwise the given folder, which must be one."""
    if resume == "latest":
        return [folder for _, folder in sorted(list_checkpoints(output_path).items(), reverse=True)]
    if not os.path.isfile(os.path.join(resume, "state.json")):
        hint = " (did you mean 'latest'?)" if resume.lower() in ("last", "lastest", "latets", "latset", "newest") else ""
        raise TrainingError(f"--resume {resume}: not a checkpoint folder (no state.json){hint}; use 'latest' or a "
                            f"{checkpoint_root(output_path)}/step-XXXXXXXX folder")
    return [resume]


def load_resumable(resume: str, output_path: str) -> Optional[dict]:
    """The checkpoint to resume from (``load_checkpoint``'s dict plus its ``folder``), or None when
    ``latest`` finds none. With ``latest`` a checkpoint that cannot be read is skipped for the
    newest one that can, saying so; a named one that cannot be read is an error naming the
    previous readable checkpoint."""
    candidates = resume_candidates(resume, output_path)
    for folder in candidates:
        try:
            return {**load_checkpoint(folder), "folder": folder}
        except (PixArtError, OSError, ValueError, KeyError) as e:
            if resume != "latest":
                older = [f for s, f in sorted(list_checkpoints(output_path).items(), reverse=True)
                         if _step_of(f) < _step_of(folder)]
                hint = f"; the newest checkpoint before it is {older[0]} (--resume {older[0]})" if older else ""
                raise TrainingError(f"checkpoint {folder} cannot be loaded ({e}){hint}") from None
            logger.warning("checkpoint %s cannot be loaded (%s): trying the one before it", folder, e)
    if candidates:
        raise TrainingError(f"none of the {len(candidates)} checkpoints in {checkpoint_root(output_path)} can be "
                            f"loaded; start over with --overwrite")
    return None


def _step_of(folder: str) -> int:
    m = _STEP_DIR.match(os.path.basename(os.path.normpath(folder)))
    return int(m.group(1)) if m else -1


def configuration_changes(stored: dict, current: dict) -> List[str]:
    """'key: stored -> current' for every setting that changes what the run computes."""
    keys = sorted((set(stored) | set(current)) - _UNCOMPARED)
    return [f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in keys if stored.get(k) != current.get(k)]


def save_checkpoint(output_path: str, step: int, write_weights: Callable[[str], None],
                    optimizer_state: Dict[str, np.ndarray], state: dict, keep_last: int = 3) -> str:
    """Write one checkpoint atomically (``write_weights(folder)`` writes the weights into it) and
    delete all but the newest ``keep_last``. A failure to write (a full disk) is an OutputError;
    the earlier checkpoints are left as they were."""
    root = checkpoint_root(output_path)
    final = os.path.join(root, f"step-{step:08d}")
    partial = final + ".partial"
    try:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        write_weights(partial)
        write_ckpt(os.path.join(partial, "optimizer.ckpt"), optimizer_state)
        with open(os.path.join(partial, "state.json"), "w") as f:
            json.dump({**state, "step": step}, f, indent=2)
        if os.path.isdir(final):
            _remove_folder(final)
        os.replace(partial, final)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise OutputError(f"could not write checkpoint {final}: {getattr(e, 'strerror', None) or e}; "
                          f"the earlier checkpoints are intact") from None
    if keep_last > 0:
        for old_step, folder in list(list_checkpoints(output_path).items())[:-keep_last]:
            _remove_folder(folder)
    return final


def model_writer(config: PixArtConfig, weights: Dict[str, np.ndarray],
                 ema_weights: Optional[Dict[str, np.ndarray]]) -> Callable[[str], None]:
    """``write_weights`` of a full finetune: model.ckpt and ema.ckpt, which sample.py loads."""
    def write(folder: str) -> None:
        save_mindspore_checkpoint(weights, config, os.path.join(folder, "model.ckpt"))
        if ema_weights is not None:
            save_mindspore_checkpoint(ema_weights, config, os.path.join(folder, "ema.ckpt"))
    return write


def load_checkpoint(folder: str) -> dict:
    """{"weights", "ema", "adapter", "adapter_ema", "controlnet", "controlnet_ema" (each None where
    the checkpoint has none), "optimizer", "state"} of a checkpoint folder: weights as NumPy
    arrays, adapters as ``LoraWeights``."""
    from pixart.models.pixart_checkpoint import read_mindspore_checkpoint
    from pixart.utils.mindspore_ckpt import read_ckpt

    def optional(name, read):
        path = os.path.join(folder, name)
        return read(path) if os.path.exists(path) else None

    def read_adapter(path):
        from pixart.models.lora import read_lora
        return read_lora(path)

    def read_branch(path):
        from pixart.models.controlnet import read_controlnet
        return read_controlnet(path)

    weights = optional("model.ckpt", lambda p: read_mindspore_checkpoint(p)[0])
    adapter = optional("adapter", read_adapter)
    controlnet = optional("controlnet.ckpt", read_branch)
    if weights is None and adapter is None and controlnet is None:
        raise ValueError(f"{folder} holds none of model.ckpt, adapter/, controlnet.ckpt")
    optimizer = read_ckpt(os.path.join(folder, "optimizer.ckpt"))
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{folder}/state.json has no step")
    return {"weights": weights, "ema": optional("ema.ckpt", lambda p: read_mindspore_checkpoint(p)[0]),
            "adapter": adapter, "adapter_ema": optional("adapter_ema", read_adapter), "controlnet": controlnet,
            "controlnet_ema": optional("controlnet_ema.ckpt", read_branch), "optimizer": optimizer, "state": state}
