"""Our streaming ``.ckpt`` reader against ``mindspore.load_checkpoint`` on files MindSpore wrote,
and our writer against ``mindspore.save_checkpoint``: the same bytes."""
import numpy as np
import pytest

import mindspore as ms
from mindspore.train import serialization

from pixart.utils import mindspore_ckpt
from pixart.utils.mindspore_ckpt import CheckpointFormatError, read_ckpt, write_ckpt


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


@pytest.mark.parametrize("float_dtype", ["fp32", "fp16", "bf16"])
def test_writer_writes_the_bytes_mindspore_writes(tmp_path, monkeypatch, float_dtype):
    from pixart.runtime import ms_dtype

    monkeypatch.setattr(serialization, "SLICE_SIZE", 1)  # KB: the 40x50 tensor is split into 8 entries
    monkeypatch.setattr(mindspore_ckpt, "SLICE_BYTES", 1024)
    rng = np.random.default_rng(1)
    floats = {"split": rng.standard_normal((40, 50)).astype(np.float32),
              # round-to-even ties, the largest float, infinities, NaNs of both signs, subnormals
              "edges": np.array([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000,
                                 0x7F800001, 0xFFFFFFFF, 0x00000001, 0x80000000], np.uint32).view(np.float32)}
    others = {"scalar": np.int64(5), "ints": np.arange(6, dtype=np.int32).reshape(2, 3)}
    text = {"config": '{"héllo": 1}', "empty": ""}
    expected = str(tmp_path / "mindspore.ckpt")
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v).astype(ms_dtype(float_dtype))} for k, v in floats.items()]
                       + [{"name": k, "data": ms.Tensor(v)} for k, v in others.items()], expected, append_dict=text)
    ours = str(tmp_path / "ours.ckpt")
    write_ckpt(ours, {**floats, **others, **text}, float_dtype=float_dtype)
    assert open(ours, "rb").read() == open(expected, "rb").read()
    back = read_ckpt(ours)
    assert back["config"] == text["config"] and back["empty"] == "" and back["scalar"] == 5
    if float_dtype == "fp32":
        np.testing.assert_array_equal(back["split"], floats["split"])


def test_writer_keeps_dtypes_without_a_cast_and_leaves_nothing_on_failure(tmp_path):
    path = str(tmp_path / "x.ckpt")
    arrays = {"half": np.ones(3, np.float16), "step": np.array(7), "flag": np.array([True, False])}
    write_ckpt(path, arrays)
    loaded = ms.load_checkpoint(path)
    assert loaded["half"].dtype == ms.float16 and int(loaded["step"].asnumpy()) == 7
    np.testing.assert_array_equal(loaded["flag"].asnumpy(), arrays["flag"])
    with pytest.raises(ValueError, match="bad: dtype complex64"):
        write_ckpt(str(tmp_path / "y.ckpt"), {"w": np.ones(2, np.float32), "bad": np.ones(2, np.complex64)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ckpt"]
