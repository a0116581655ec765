"""The flags of train.py (and of tools/cache_features.py, which reads the same configs): one
per ``TrainConfig`` field, plus how the process runs (data parallel, device)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing

from pixart.cli import str2bool
from pixart.runtime import DEVICES
from pixart.training.config import TrainConfig


def json_dict(text):
    """argparse type: a JSON object (YAML may give the mapping itself)."""
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


json_dict.accepts_mapping = True


def _argument(field: dataclasses.Field, hint) -> dict:
    """argparse keyword arguments for a TrainConfig field of type ``hint``."""
    extras = dict(field.metadata)
    extras.pop("group")
    kwargs = dict(default=field.default_factory() if field.default_factory is not dataclasses.MISSING
                  else field.default, help=extras.pop("help"))
    if extras.pop("type", None) == "json":
        kwargs["type"] = json_dict
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union:  # Optional[X]
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    if typing.get_origin(hint) in (list, typing.List):
        kwargs["nargs"] = "+"
        hint = args[0]
    if "type" not in kwargs and hint is not str:
        kwargs["type"] = {bool: str2bool, int: int, float: float}[hint]
    kwargs.update(extras)
    return kwargs


def build_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", help="YAML file with defaults for any of the flags below")
    hints = typing.get_type_hints(TrainConfig)
    groups = {}
    for field in dataclasses.fields(TrainConfig):
        group = field.metadata["group"]
        if group not in groups:
            groups[group] = p.add_argument_group(group)
        groups[group].add_argument(f"--{field.name}", **_argument(field, hints[field.name]))
    groups["model"].add_argument("--pretrained", metavar="ID",
                                 help="a diffusers pipeline already in the local Hugging Face cache, never downloaded "
                                      "(e.g. PixArt-alpha/PixArt-Sigma-XL-2-512-MS; or a local pipeline folder): its "
                                      "transformer/, vae/, text_encoder/ and tokenizer/ replace the config's "
                                      "--checkpoint and model folders; those flags given on the command line win")
    runtime = groups["runtime"]
    runtime.add_argument("--use_parallel", type=str2bool, default=False, help="data parallel over msrun workers")
    runtime.add_argument("--device", choices=DEVICES, default=None, help="MindSpore device (default: the installed "
                                                                        "backend)")
    return p
