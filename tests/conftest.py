"""Shared test set-up: MindSpore on CPU in PyNative mode, and the ../shared folder."""
import os

import mindspore as ms
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")

ms.set_context(mode=ms.PYNATIVE_MODE)
ms.set_device("CPU")


@pytest.fixture(scope="session")
def shared_dir():
    if not os.path.isdir(SHARED):
        pytest.fail(f"../shared is missing (expected at {SHARED}); tests read reference data from it")
    return SHARED
