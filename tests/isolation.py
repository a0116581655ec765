"""Run a memory-hungry check in a fresh interpreter.

One pytest process never returns what an XL/2-sized check held (two 2.5 GB models, their converted
copies, MindSpore's compiled graph), so two such checks in a row exceed a 24 GB machine; a spawned
child gives it all back when it exits. Such checks also run one at a time on the machine (a file
lock): `make test` runs two pytest workers, and two of them at once could need more than 24 GB.
"""
import fcntl
import importlib
import multiprocessing
import os
import tempfile

LOCK_PATH = os.path.join(tempfile.gettempdir(), "pixart-tests-memory-hungry.lock")


def _call(func, args):
    importlib.import_module("tests.conftest")  # the parent's MindSpore context: CPU, PyNative
    func(*args)


def in_fresh_process(func, *args):
    """Call ``func(*args)`` (a module-level function) in a spawned interpreter; its exception is re-raised here."""
    with open(LOCK_PATH, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            pool.apply(_call, (func, args))
