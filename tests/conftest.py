"""Shared test set-up: MindSpore on CPU in PyNative mode, and the ../shared folder."""
import os
import socket
import subprocess
import sys
import tempfile

import mindspore as ms
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
# MindSpore's compile-failure dumps (rank_0/om/...) go to a temporary folder, as the scripts arrange
os.environ.setdefault("MS_OM_PATH", os.path.join(tempfile.gettempdir(), "pixart-mindspore-ir"))

ms.set_context(mode=ms.PYNATIVE_MODE)
ms.set_device("CPU")


@pytest.fixture(scope="session")
def shared_dir():
    if not os.path.isdir(SHARED):
        pytest.fail(f"../shared is missing (expected at {SHARED}); tests read reference data from it")
    return SHARED


# `make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadfile --no-loadscope-reorder`).
# A test file is one unit of work, as in a serial run: its tests run in their order on one worker,
# and its module fixtures (tiny models, reference training runs) are built once. test_train.py,
# about 40% of the suite's test time, starts first, so the other worker takes the rest meanwhile.
LONGEST_FILE = "test_train.py"


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: os.path.basename(str(item.path)) != LONGEST_FILE)


def free_port() -> int:
    """A loopback port no one listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_msrun(script_args, log_dir, timeout=900):
    """Launch ``script_args`` (a script and its flags) on 2 msrun workers of this venv's Python, on a
    free port (the default one may be taken by another msrun job, another xdist worker's included);
    the worker logs by file name. A failed launch fails the test with the workers' last words."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    proc = subprocess.run(["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}",
                           f"--log_dir={log_dir}", "--join=True", *map(str, script_args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    worker_logs = {f: open(os.path.join(log_dir, f)).read() for f in os.listdir(log_dir) if f.startswith("worker")}
    assert proc.returncode == 0, proc.stderr[-2000:] + "\n".join(v[-2000:] for v in worker_logs.values())
    return worker_logs
