"""What every script shares: flags that a YAML config can also set, and one-line errors.

Scripts declare their flags with argparse; ``parse_with_config`` reads ``-c FILE``, checks that
every YAML key is a known flag of the right type (an unknown or ill-typed key is an error
naming it), uses the YAML values as defaults, then lets the command line override them.
A script's ``main`` is an ``@entry_point``: the library raises ``PixArtError``s, and only there
do they become a one-line message and an exit code. Nothing here imports MindSpore, so ``-h`` is fast.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Callable, List, Optional

import yaml

from pixart.errors import ConfigError, PixArtError


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


def non_negative_int(value) -> int:
    """argparse type: an integer >= 0 (seeds, counts)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 0 or (isinstance(value, float) and value != number):
        raise argparse.ArgumentTypeError(f"expected a non-negative whole number, got {value!r}")
    return number


def positive_int(value) -> int:
    """argparse type: an integer >= 1."""
    number = non_negative_int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value!r}")
    return number


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def _typed(action: argparse.Action, key: str, value):
    """One YAML scalar converted as the flag's ``type`` would convert it from the command line."""
    if isinstance(value, (list, dict)):
        raise ConfigError(f"{key}: expected a single value, got {type(value).__name__} {value!r}")
    if action.type is None:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected text, got {type(value).__name__} {value!r} (quote it in the YAML)")
        return value
    if getattr(action.type, "accepts_mapping", False) and isinstance(value, dict):
        return value
    try:
        return action.type(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise ConfigError(f"{key}: {e}") from None


def config_value(action: argparse.Action, key: str, value):
    """A YAML value for flag ``action``: typed as on the command line, a single value where the
    flag takes a list becoming a one-element list, and choices checked."""
    if value is None:
        return None
    takes_list = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if isinstance(value, dict) and getattr(action.type, "accepts_mapping", False):
        return value
    if takes_list:
        items = value if isinstance(value, list) else [value]
        if action.nargs == "+" and not items:
            raise ConfigError(f"{key}: expected at least one value, got an empty list")
        value = [_typed(action, key, item) for item in items]
        bad = [v for v in value if action.choices is not None and v not in action.choices]
    else:
        value = _typed(action, key, value)
        bad = [value] if action.choices is not None and value not in action.choices else []
    if bad:
        raise ConfigError(f"{key}: {bad[0]!r} is not one of {', '.join(map(str, action.choices))}")
    return value


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
        try:
            defaults = {key: config_value(actions[key], key, value) for key, value in values.items()}
        except ConfigError as e:
            parser.error(f"{known.config}: {e}")
        parser.set_defaults(**defaults)
        for action in parser._actions:  # a flag required on the command line may come from YAML instead
            if action.dest in defaults:
                action.required = False
    return parser.parse_args(argv)


def fail(message: str, code: int = 1):
    """End a script with a one-line error, no stack trace."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def entry_point(main: Callable[..., Optional[int]]) -> Callable[..., int]:
    """Decorator for a script's ``main(argv=None)``: the library's errors become a one-line
    message and exit status 1, Ctrl-C status 130, both without a traceback."""
    @functools.wraps(main)
    def wrapped(argv: Optional[List[str]] = None) -> int:
        try:
            return main(argv) or 0
        except PixArtError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    return wrapped
