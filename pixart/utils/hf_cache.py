"""Models that Hugging Face tools already downloaded, found in the local hub cache; never a download.

``huggingface-cli download ORG/NAME`` (and diffusers' ``from_pretrained``) keep a model under the
hub cache, ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``::

    models--ORG--NAME/refs/main            the commit hash of the downloaded revision
    models--ORG--NAME/snapshots/HASH/...   that commit's files (links into blobs/)

A diffusers pipeline's snapshot holds one folder per part (``transformer/``, ``vae/``,
``text_encoder/``, ``tokenizer/``), each what our loaders read as it is.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional

from pixart.errors import ConfigError

# the model flag each part of a diffusers pipeline fills -> (its subfolder, the files that make it usable:
# one name of each tuple must be there; "*.safetensors" means any safetensors file, sharded or not)
PARTS = {
    "checkpoint": ("transformer", (("config.json",), ("*.safetensors",))),
    "vae_root": ("vae", (("config.json",), ("*.safetensors",))),
    "text_encoder_root": ("text_encoder", (("config.json",), ("*.safetensors",))),
    "tokenizer_root": ("tokenizer", (("spiece.model", "tokenizer.json"),)),
}


def hub_cache_dir() -> str:
    """The hub cache folder, as huggingface_hub chooses it."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _how_to_get(repo_id: str) -> str:
    return (f"on a machine with internet run `huggingface-cli download {repo_id}` and copy its hub cache here "
            f"(or point HF_HUB_CACHE at it), or give the model flags yourself (a .ckpt from tools/convert.py)")


def snapshot_folder(repo_id: str) -> str:
    """The folder of ``repo_id``'s downloaded ``main`` revision; a local pipeline folder is taken
    as it is. ConfigError saying where it looked when the model is not in the cache."""
    if os.path.isdir(repo_id):
        return repo_id
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ConfigError(f"--pretrained {repo_id!r}: expected a Hugging Face model id ORG/NAME "
                          f"(e.g. PixArt-alpha/PixArt-Sigma-XL-2-1024-MS) or a local pipeline folder")
    model_dir = os.path.join(hub_cache_dir(), "models--" + repo_id.replace("/", "--"))
    ref = os.path.join(model_dir, "refs", "main")
    try:
        with open(ref) as f:
            commit = f.read().strip()
    except OSError:
        raise ConfigError(f"--pretrained {repo_id}: not in the Hugging Face cache (no {ref}; the cache is "
                          f"$HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub); "
                          f"{_how_to_get(repo_id)}") from None
    snapshot = os.path.join(model_dir, "snapshots", commit)
    if not os.path.isdir(snapshot):
        raise ConfigError(f"--pretrained {repo_id}: {ref} names commit {commit}, but {snapshot} is not there; "
                          f"{_how_to_get(repo_id)}")
    return snapshot


def _complete(folder: str, needs) -> bool:
    """Whether ``folder`` holds one file of each group of ``needs`` (links whose blob is missing
    do not count)."""
    if not os.path.isdir(folder):
        return False
    names = {name for name in os.listdir(folder) if os.path.exists(os.path.join(folder, name))}
    has_weights = any(name.endswith(".safetensors") for name in names)
    return all(any(has_weights if n == "*.safetensors" else n in names for n in group) for group in needs)


def pretrained_parts(repo_id: str, flags: Iterable[str]) -> Dict[str, str]:
    """{flag: folder} of the parts of the cached pipeline ``repo_id`` that ``flags`` (names in
    ``PARTS``) ask for. Parts its ``model_index.json`` does not list are left out (a DiT pipeline
    has no text encoder); ConfigError naming every listed part that is missing or incomplete."""
    snapshot = snapshot_folder(repo_id)
    try:
        with open(os.path.join(snapshot, "model_index.json")) as f:
            listed = set(json.load(f))
    except (OSError, ValueError):
        listed = None  # not a saved pipeline: every part must be there
    found, missing = {}, []
    for flag in flags:
        subfolder, needs = PARTS[flag]
        if listed is not None and subfolder not in listed:
            continue
        folder = os.path.join(snapshot, subfolder)
        if _complete(folder, needs):
            found[flag] = folder
        else:
            missing.append(f"{subfolder}/ (--{flag})")
    if missing:
        raise ConfigError(f"--pretrained {repo_id}: {snapshot} lacks {', '.join(missing)}; "
                          f"{_how_to_get(repo_id)}")
    return found


def apply_pretrained(args, argv: Optional[List[str]] = None) -> None:
    """Point the model flags of ``args`` (an argparse namespace of sample.py's, the web demo's or
    train.py's) at the parts of its --pretrained pipeline, except the flags named on the command
    line ``argv`` (default ``sys.argv[1:]``), which win; a config file's paths give way."""
    if not getattr(args, "pretrained", None):
        return
    import sys

    given = {arg.split("=")[0] for arg in (sys.argv[1:] if argv is None else argv)}
    for flag, folder in pretrained_parts(args.pretrained, [f for f in PARTS if f"--{f}" not in given]).items():
        setattr(args, flag, folder)
