"""Writing outputs safely: nothing a user made is overwritten unasked, nothing half-written is left.

Every file the project writes goes through a temporary name in the same folder and is renamed
(or hard-linked, where an existing file must not be replaced) into place only once complete.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Callable, Iterator

from pixart.errors import ConfigError, OutputError


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (also through links); False if either does not exist."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def refuse_existing(path: str, overwrite: bool, flag: str = "--overwrite") -> None:
    """ConfigError if ``path`` exists and ``overwrite`` is not set."""
    if os.path.lexists(path) and not overwrite:
        kind = "folder" if os.path.isdir(path) else "file"
        raise ConfigError(f"{path} already exists (a {kind}); choose another target or pass {flag} to replace it")


def check_writable_folder(folder: str, what: str = "output folder") -> None:
    """Create ``folder`` if needed and prove a file can be written there, before any long work;
    OutputError (naming the folder and why) otherwise."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OutputError(f"{what} {folder!r} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise OutputError(f"cannot write to the {what} {folder!r}: {e.strerror or e}") from None


@contextlib.contextmanager
def temporary_sibling(path: str) -> Iterator[str]:
    """A temporary file name next to ``path`` (same file system, so a rename is atomic), removed
    on the way out unless it was moved into place."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def place_new(tmp: str, path: str) -> None:
    """Move the complete file ``tmp`` to ``path``, which must not exist (FileExistsError if it
    does, also when another process creates it meanwhile)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: claim the name, then replace the claim
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        os.replace(tmp, path)


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` a complete file at a temporary name, then rename it to ``path``: a failure
    (a full disk, a kill) leaves no partial file at ``path``."""
    with temporary_sibling(path) as tmp:
        write(tmp)
        os.replace(tmp, path)


def write_text_atomically(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    write_atomically(path, write)
