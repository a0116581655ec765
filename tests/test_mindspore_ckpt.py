"""Our streaming ``.ckpt`` reader against ``mindspore.load_checkpoint`` on files MindSpore wrote."""
import numpy as np
import pytest

import mindspore as ms
from mindspore.train import serialization

from pixart.utils.mindspore_ckpt import CheckpointFormatError, read_ckpt


def _params():
    rng = np.random.default_rng(0)
    return [
        {"name": "split", "data": ms.Tensor(rng.standard_normal((40, 50)).astype(np.float32))},
        {"name": "half", "data": ms.Tensor(rng.standard_normal((7,)).astype(np.float16))},
        {"name": "brain", "data": ms.Tensor(rng.standard_normal((3, 5)).astype(np.float32)).astype(ms.bfloat16)},
        {"name": "scalar", "data": ms.Tensor(np.int64(5))},
        {"name": "ints", "data": ms.Tensor(np.arange(6, dtype=np.int32).reshape(2, 3))},
    ]


@pytest.mark.parametrize("crc_check", [False, True])
def test_matches_mindspore_loader(tmp_path, monkeypatch, crc_check):
    monkeypatch.setattr(serialization, "SLICE_SIZE", 1)  # KB: "split" is written as 8 entries
    path = str(tmp_path / "x.ckpt")
    ms.save_checkpoint(_params(), path, append_dict={"config": '{"héllo": 1}', "step": 3}, crc_check=crc_check)
    expected = ms.load_checkpoint(path)
    ours = read_ckpt(path)
    assert sorted(ours) == sorted(expected)
    for name, value in expected.items():
        if isinstance(value, str):
            assert ours[name] == value
            continue
        ref = value.astype(ms.float32).asnumpy() if value.dtype == ms.bfloat16 else value.asnumpy()
        assert ours[name].dtype == ref.dtype and ours[name].shape == ref.shape
        np.testing.assert_array_equal(ours[name], ref)
    assert read_ckpt(path, select=lambda n: n == "config") == {"config": '{"héllo": 1}'}


def test_bad_files_raise_a_clear_error(tmp_path):
    path = str(tmp_path / "x.ckpt")
    ms.save_checkpoint(_params(), path)
    data = open(path, "rb").read()
    cases = {"truncated.ckpt": data[: len(data) // 2], "garbage.ckpt": b"\xff" * 100, "empty.ckpt": b""}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointFormatError, match=name):
            read_ckpt(str(tmp_path / name))
    with pytest.raises(CheckpointFormatError, match="no such file"):
        read_ckpt(str(tmp_path / "missing.ckpt"))
