"""Shared test set-up: MindSpore on CPU in PyNative mode, and the ../shared folder."""
import os
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
