"""The device set-up every script shares: precision by name (``auto`` per device), compiler level
and memory cap passed on to MindSpore, and their one-line refusals."""
import mindspore as ms
import pytest

from pixart import runtime
from pixart.errors import ConfigError


def test_auto_precision_is_half_on_accelerators_and_fp32_on_cpu():
    assert runtime.compute_dtype("auto", "CPU") == ms.float32
    assert runtime.compute_dtype("auto", "GPU") == ms.float16
    assert runtime.compute_dtype("auto", "Ascend") == ms.float16
    assert runtime.compute_dtype("bf16", "Ascend") == ms.bfloat16
    with pytest.raises(ConfigError, match="--dtype fp16 is not supported on CPU"):
        runtime.compute_dtype("fp16", "CPU")
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'"):
        runtime.compute_dtype("fp8", "GPU")


def test_jit_level_reaches_every_compiled_function(monkeypatch):
    seen = []
    monkeypatch.setattr(ms, "jit", lambda fn, **options: seen.append(options) or fn)
    try:
        assert runtime.setup_device("CPU", jit_level="O1") == "CPU"
        runtime.jit(len)
        assert seen == [{"jit_level": "O1"}]
        runtime.setup_device("CPU")
        runtime.jit(len)
        assert seen[-1] == {"jit_level": "O0"}
    finally:
        runtime.setup_device("CPU")
    assert runtime.jit_options("O2", "Ascend") == {"backend": "GE"}
    with pytest.raises(ConfigError, match="O2 .*Ascend only, not on CPU"):
        runtime.setup_device("CPU", jit_level="O2")
    with pytest.raises(ConfigError, match="unknown --jit_level 'O3'"):
        runtime.jit_options("O3", "Ascend")


def test_max_device_memory_is_passed_to_mindspore(monkeypatch):
    sizes = []
    monkeypatch.setattr(ms.runtime, "set_memory", lambda max_size: sizes.append(max_size))
    runtime.setup_device("CPU", max_device_memory="58GB")
    runtime.setup_device("CPU", max_device_memory=" 512 mb")
    runtime.setup_device("CPU")
    assert sizes == ["58GB", "512MB"]
    for bad in ("lots", "0GB", "58", "-3GB"):
        with pytest.raises(ConfigError, match="expected a size such as 58GB"):
            runtime.memory_size(bad)
