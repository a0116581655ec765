"""Command-line options that a YAML config can also set.

Scripts declare their flags with argparse as usual; ``parse_with_config`` reads ``-c FILE``,
checks that every YAML key is a known flag (an unknown key is an error naming it), uses the
YAML values as defaults, then lets the command line override them.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

import yaml


def str2bool(value) -> bool:
    """Flags like ``--multi_scale True`` (the original MindSpore port's style) and YAML booleans."""
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got {value!r}")


class ConfigError(ValueError):
    """A config file that is missing, unreadable or has keys the script does not know."""


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def parse_with_config(parser: argparse.ArgumentParser, argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` with YAML defaults from ``-c/--config``. Exits with a message (status 2)
    on an unknown or ill-typed YAML key, as argparse does for a bad flag."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        try:
            values = load_yaml(known.config)
        except ConfigError as e:
            parser.error(str(e))
        actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
        unknown = sorted(set(values) - set(actions))
        if unknown:
            parser.error(f"{known.config}: unknown key(s) {', '.join(unknown)}; valid keys are the long flags "
                         f"without dashes (see -h)")
        defaults = {}
        for key, value in values.items():
            action = actions[key]
            if value is not None and action.type is not None and not isinstance(value, (list, dict)):
                try:
                    value = action.type(value)
                except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                    parser.error(f"{known.config}: {key}: {e}")
            if action.choices is not None and value not in action.choices and value is not None:
                parser.error(f"{known.config}: {key}: {value!r} is not one of {', '.join(map(str, action.choices))}")
            defaults[key] = value
        parser.set_defaults(**defaults)
        for action in parser._actions:  # a flag required on the command line may come from YAML instead
            if action.dest in defaults:
                action.required = False
    return parser.parse_args(argv)


def fail(message: str, code: int = 1):
    """End a script with a one-line error, no stack trace."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
