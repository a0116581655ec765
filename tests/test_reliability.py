"""Hostile and mistaken input: nothing crashes, nothing is corrupted, nothing is lost.

One regression test per finding of the hostile-input pass (issue 20); the training-folder and
resume findings are in test_train.py, next to the training fixtures they need.
"""
import collections
import errno
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from tests.conftest import ROOT
from tests.test_sample import build_components
from tools import convert

PYTHON = sys.executable


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared_dir):
    """A tiny random PixArt-Σ in the real formats (transformer .ckpt, VAE, T5, real tokenizer)."""
    folder = tmp_path_factory.mktemp("hostile")
    build_components(folder, None)
    ckpt = folder / "transformer.ckpt"
    assert convert.main(["--source", str(folder / "transformer"), "--target", str(ckpt),
                         "--model_max_length", "300"]) == 0
    return {"folder": folder, "ckpt": ckpt,
            "models": ["--checkpoint", str(ckpt), "--vae_root", str(folder / "vae"), "--text_encoder_root",
                       str(folder / "text_encoder"), "--tokenizer_root", os.path.join(shared_dir, "t5_tokenizer")]}


def run(script, *args, cwd=ROOT):
    return subprocess.run([PYTHON, os.path.join(ROOT, script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def one_line_error(proc, *fragments, code=1):
    message = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    assert proc.returncode == code, proc.stdout[-1500:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr[-3000:])
    return message


# ---------------------------------------------------------------- 1. weight files trust nothing

class _Storage:
    """Pickles as a persistent torch storage reference, as torch.save writes one."""

    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class _CraftedTensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return "storage", torch.FloatStorage, obj.key, "cpu", obj.numel
        return None


def crafted_pth(path, tensors, storage_bytes):
    """A torch.save-layout zip whose tensors' size/stride/offset are whatever we say."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump({"state_dict": tensors})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buffer.getvalue())
        z.writestr("archive/data/0", storage_bytes)
    return path


@pytest.mark.parametrize("offset,size,stride,message", [
    (0, (4, 4), (1 << 40, 1), "reach element"),            # a stride far past the storage: once a segfault
    (0, (8, 8), (8, 1), "of a storage of 16 elements"),    # a shape larger than its storage: once leaked memory
    (20, (2,), (1,), "reach element 22"),                  # an offset past the end
    (-3, (2,), (1,), "malformed"),                          # negative numbers
    (0, (2, -1), (1, 1), "malformed"),
    (0, (2, 2), (1,), "malformed"),                         # size and stride of different lengths
])
def test_pth_tensor_bounds_are_checked(tmp_path, offset, size, stride, message):
    storage = _Storage("0", 16)
    path = crafted_pth(tmp_path / "crafted.pth", {"ok": _CraftedTensor(storage, 0, (4,), (1,)),
                                                  "blocks.0.attn.qkv.weight": _CraftedTensor(storage, offset, size,
                                                                                             stride)},
                       np.arange(16, dtype=np.float32).tobytes())
    target = tmp_path / "out.ckpt"
    proc = run("tools/convert.py", "--source", path, "--target", target)
    one_line_error(proc, "state_dict.blocks.0.attn.qkv.weight", message)
    assert not target.exists()


def test_a_valid_crafted_pth_still_reads(tmp_path):
    from pixart.utils import torch_pickle

    storage = _Storage("0", 16)
    path = crafted_pth(tmp_path / "ok.pth", {"t": _CraftedTensor(storage, 2, (2, 3), (4, 1)),
                                             "empty": _CraftedTensor(storage, 16, (0, 3), (3, 1))},
                       np.arange(16, dtype=np.float32).tobytes())
    loaded = torch_pickle.load(str(path))["state_dict"]
    np.testing.assert_array_equal(loaded["t"], np.arange(16, dtype=np.float32)[2:].reshape(-1)[
        np.array([[0, 1, 2], [4, 5, 6]])])
    assert loaded["empty"].shape == (0, 3)


def write_raw_safetensors(path, header, data=b""):
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)
    return path


@pytest.mark.parametrize("header,data,message", [
    ([1, 2, 3], b"", "must be a JSON object"),
    ({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}, bytes(16), "needs 64 bytes"),
    ({"w": {"dtype": "F32", "shape": [2, -2], "data_offsets": [0, 16]}}, bytes(16), "non-negative integers"),
    ({"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "unsupported dtype"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), "data_offsets"),
    ({"w": "F32"}, b"", "not an object"),
])
def test_safetensors_headers_are_checked(tmp_path, header, data, message):
    from pixart.errors import SafetensorsError
    from pixart.utils.safetensors_io import load_file

    path = write_raw_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(SafetensorsError, match=message):
        load_file(str(path))
    proc = run("tools/convert.py", "--source", path, "--target", tmp_path / "out.ckpt")
    one_line_error(proc, message)


# ---------------------------------------------------------------- 3. convert never overwrites unasked

def test_convert_refuses_to_overwrite(tmp_path, tiny):
    source = tiny["folder"] / "transformer"
    target = tmp_path / "model.ckpt"
    target.write_bytes(b"my own file")
    one_line_error(run("tools/convert.py", "--source", source, "--target", target), "already exists", "--overwrite")
    assert target.read_bytes() == b"my own file"
    assert run("tools/convert.py", "--source", source, "--target", target, "--overwrite").returncode == 0
    assert target.stat().st_size > 1000
    # never the source itself, even with --overwrite
    size = tiny["ckpt"].stat().st_size
    one_line_error(run("tools/convert.py", "--source", tiny["ckpt"], "--target", tiny["ckpt"], "--overwrite"),
                   "is the source itself")
    assert tiny["ckpt"].stat().st_size == size
    one_line_error(run("tools/convert.py", "--source", source, "--target", tmp_path), "is a folder")
    # the reverse direction: onto a file, or into a folder that already has an export
    some_file = tmp_path / "transformer"
    some_file.write_text("not a folder")
    one_line_error(run("tools/convert.py", "--source", tiny["ckpt"], "--target", some_file), "is a file")
    export = tmp_path / "export"
    assert run("tools/convert.py", "--source", tiny["ckpt"], "--target", export).returncode == 0
    one_line_error(run("tools/convert.py", "--source", tiny["ckpt"], "--target", export), "already exists")
    assert run("tools/convert.py", "--source", tiny["ckpt"], "--target", export, "--overwrite").returncode == 0


# ---------------------------------------------------------------- 4. YAML lists and types

def test_yaml_list_keys_take_one_value_and_wrong_types_are_named(tmp_path, tiny):
    from pixart.cli import parse_with_config
    from pixart.cli.inference import build_parser

    config = tmp_path / "c.yaml"
    config.write_text("prompt: seven\nkv_compress_layers: 3\n")
    args = parse_with_config(build_parser(""), ["-c", str(config)])
    assert args.prompt == ["seven"] and args.kv_compress_layers == [3]
    for text, fragment in (("prompt: 5\n", "prompt: expected text"), ("image_height: [32]\n", "image_height"),
                           ("seed: -1\n", "seed"), ("sampling_method: [dpm]\n", "sampling_method")):
        config.write_text(text)
        proc = run("sample.py", "-c", config, *tiny["models"])
        one_line_error(proc, fragment, code=2)


# ---------------------------------------------------------------- 5. outputs checked first, written whole

def test_unwritable_output_is_refused_before_any_work(tmp_path, tiny):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for output in (blocker, blocker / "sub"):
        proc = run("sample.py", "--prompt", "a cat", "--output_path", output, *tiny["models"])
        one_line_error(proc, str(blocker))
        assert "encoding" not in proc.stdout  # refused before T5 was even loaded


def test_a_failed_png_write_leaves_no_partial_file(tmp_path, monkeypatch):
    from PIL import Image

    from pixart.errors import OutputError
    from pixart.utils.images import save_png

    image = np.zeros((8, 8, 3), np.uint8)
    first = save_png(image, str(tmp_path), "ok", {"seed": "1"})

    def full_disk(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(OutputError, match="No space left on device"):
        save_png(image, str(tmp_path), "lost", {"seed": "2"})
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(first)]


# ---------------------------------------------------------------- 6, 7, 9, 10. sample.py inputs

def test_sizes_beyond_the_model_are_refused_with_one_rule(tiny, tmp_path):
    proc = run("sample.py", "--prompt", "x", "--image_height", "100000", "--output_path", tmp_path, *tiny["models"])
    one_line_error(proc, "image sides must be from 16 to 128 pixels", "100000x1024")
    assert not list(tmp_path.iterdir())


def test_parts_of_different_models_are_refused_before_compiling(tiny, tmp_path, shared_dir):
    from transformers import T5Config, T5EncoderModel

    wide = tmp_path / "t5-wide"
    T5EncoderModel(T5Config(vocab_size=32128, d_model=48, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                            dropout_rate=0.0)).save_pretrained(wide)
    models = list(tiny["models"])
    models[models.index("--text_encoder_root") + 1] = str(wide)
    work = tmp_path / "cwd"
    work.mkdir()
    proc = run("sample.py", "--prompt", "x", "--output_path", tmp_path / "out", *models, cwd=work)
    one_line_error(proc, "reads 32-channel caption features", "makes 48-channel ones")
    assert not os.listdir(work), "MindSpore's IR dumps must stay out of the working folder"

    ref_model = __import__("tests.torch_pixart", fromlist=["build_diffusers"]).build_diffusers(in_channels=8)
    ref_model.save_pretrained(tmp_path / "eight")
    assert convert.main(["--source", str(tmp_path / "eight"), "--target", str(tmp_path / "eight.ckpt"),
                         "--model_max_length", "300"]) == 0
    models = list(tiny["models"])
    models[models.index("--checkpoint") + 1] = str(tmp_path / "eight.ckpt")
    proc = run("sample.py", "--prompt", "x", "--output_path", tmp_path / "out", *models)
    one_line_error(proc, "denoises 8-channel latents", "has 4")


def test_prompt_and_latent_files_are_checked(tiny, tmp_path):
    latin1 = tmp_path / "prompts.txt"
    latin1.write_bytes("café au lait\n".encode("latin-1"))
    one_line_error(run("sample.py", "--prompt_path", latin1, *tiny["models"]), "is not UTF-8 text")
    one_line_error(run("sample.py", "--prompt", "   ", *tiny["models"]), "--prompt 1 is empty")
    text = tmp_path / "latents.npy"
    text.write_text("not an array")
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((4, 8, 8), np.nan, np.float32))
    for path, fragment in ((text, "not a NumPy .npy array"), (pickled, "not a NumPy .npy array"),
                           (nan, "NaN or infinite")):
        proc = run("sample.py", "--prompt", "x", "--latents", path, "--output_path", tmp_path / "o", *tiny["models"])
        one_line_error(proc, "--latents", fragment)


def test_flag_values_are_named(tiny):
    proc = run("sample.py", "--prompt", "x", "--seed", "-1", *tiny["models"])
    one_line_error(proc, "argument --seed", "non-negative", code=2)
    proc = run("sample.py", "--prompt", "x", "--batch_size", "0", *tiny["models"])
    one_line_error(proc, "argument --batch_size", code=2)


# ---------------------------------------------------------------- 8. head counts

@pytest.mark.parametrize("heads,fragment,code", [("0", "argument --num_heads", 2), ("-4", "argument --num_heads", 2),
                                                 ("5", "positive divisor of hidden_size 64", 1)])
def test_head_count_is_validated(tmp_path, tiny, heads, fragment, code):
    target = tmp_path / "x.ckpt"
    proc = run("tools/convert.py", "--source", tiny["folder"] / "transformer", "--target", target, "--num_heads", heads)
    one_line_error(proc, fragment, code=code)
    assert not target.exists()


# ---------------------------------------------------------------- 9, 11. training checkpoints

def tiny_checkpoint(root, step, optimizer=True):
    folder = root / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"step": step}))
    if optimizer:
        (folder / "optimizer.ckpt").write_bytes(b"x")
    return folder


def test_a_full_disk_while_saving_keeps_the_previous_checkpoints(tmp_path, monkeypatch):
    import errno

    from pixart.errors import OutputError
    from pixart.models.pixart import PixArtConfig
    from pixart.training import checkpoints
    from pixart.utils import mindspore_ckpt

    config = PixArtConfig(input_size=8, depth=1, hidden_size=16, num_heads=2, caption_channels=8, model_max_length=2)
    weights = {"w": np.ones((2, 2), np.float32)}
    write = checkpoints.model_writer(config, weights, None)
    first = checkpoints.save_checkpoint(str(tmp_path), 1, write, {"adamw.step": np.array(1)}, {})

    def full_disk(path, write_file):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mindspore_ckpt, "write_atomically", full_disk)
    with pytest.raises(OutputError, match="could not write checkpoint .*step-00000002: No space left on device; "
                                          "the earlier checkpoints are intact"):
        checkpoints.save_checkpoint(str(tmp_path), 2, write, {"adamw.step": np.array(2)}, {})
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-00000001"]
    assert checkpoints.load_checkpoint(first)["state"]["step"] == 1


def test_pruning_renames_first_so_no_checkpoint_is_ever_half_deleted(tmp_path, monkeypatch):
    import shutil

    from pixart.training import checkpoints

    tiny_checkpoint(tmp_path, 1)
    tiny_checkpoint(tmp_path, 2)
    seen = []
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):  # a kill during the delete: the folder is half gone
        seen.append(os.path.basename(path))
        os.remove(os.path.join(path, "optimizer.ckpt"))
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoints._remove_folder(str(tmp_path / "checkpoints" / "step-00000001"))
    monkeypatch.setattr(checkpoints.shutil, "rmtree", real_rmtree)
    assert seen == ["step-00000001.deleting"]
    assert list(checkpoints.list_checkpoints(str(tmp_path))) == [2]  # the half-deleted one is not a checkpoint
    checkpoints.prepare_output(str(tmp_path), "latest", overwrite=False)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-00000002"]


def ranks_all_reduce(steps):
    """An all-reduce sum over ranks that resolved ``steps``, as seen from any one of them."""
    rows = np.diag(np.asarray(steps, np.float32))  # rank r's one-hot row

    def all_reduce(row):
        assert any(np.array_equal(row, r) for r in rows)
        return rows.sum(0)
    return all_reduce


@pytest.mark.parametrize("steps,expected", [
    ([4, 4, 4], [None] * 3), ([-1, -1], [None] * 2),
    ([4, -1], ["rank 0 sees checkpoint step 4 but another rank sees no checkpoint",
               "rank 1 sees no checkpoint but another rank sees checkpoint step 4"]),
    ([6, 4, 6], ["rank 0 sees checkpoint step 6 but another rank sees checkpoint step 4",
                 "rank 1 sees checkpoint step 4 but another rank sees checkpoint step 6",
                 "rank 2 sees checkpoint step 6 but another rank sees checkpoint step 4"]),
    ([4, -2], ["rank 0 sees checkpoint step 4 but another rank sees a checkpoint it cannot load",
               "rank 1 sees a checkpoint it cannot load but another rank sees checkpoint step 4"])])
def test_ranks_resuming_from_different_checkpoints_are_told(steps, expected):
    from pixart.training.trainer import resume_disagreement

    for rank, step in enumerate(steps):
        problem = resume_disagreement(step, rank, len(steps), ranks_all_reduce(steps))
        if expected[rank] is None:
            assert problem is None
        else:
            assert problem.startswith(expected[rank]) and "--resume needs the output folder" in problem


def test_a_rank_that_cannot_see_the_checkpoint_fails_the_resume(tmp_path, monkeypatch):
    from pixart.errors import TrainingError
    from pixart.training import checkpoints
    from pixart.training import trainer as trainer_module
    from pixart.training.config import TrainConfig

    trainer = trainer_module.Trainer.__new__(trainer_module.Trainer)  # rank 1 of 2, no model
    trainer.cfg, trainer.rank, trainer.world = TrainConfig(resume="latest", output_path=str(tmp_path)), 1, 2
    # rank 0 resumes step 4; this rank's copy of the output folder has no checkpoint
    monkeypatch.setattr(trainer_module, "all_reduce_sum", ranks_all_reduce([4, -1]))
    with pytest.raises(TrainingError, match="rank 1 sees no checkpoint but another rank sees checkpoint step 4"):
        trainer._resume_checkpoint()
    # a rank whose checkpoint does not load still joins the check (or the others would wait for
    # it), then fails with its own reason
    calls = []
    monkeypatch.setattr(trainer_module, "all_reduce_sum", lambda row: calls.append(row.tolist()) or row * 0 - 2)

    def unloadable(resume, output_path):
        raise TrainingError("checkpoint step-00000004 cannot be loaded")
    monkeypatch.setattr(checkpoints, "load_resumable", unloadable)
    with pytest.raises(TrainingError, match="step-00000004 cannot be loaded"):
        trainer._resume_checkpoint()
    assert calls == [[0.0, -2.0]]
    # on one process nothing is gathered
    trainer.world, calls[:] = 1, []
    monkeypatch.setattr(checkpoints, "load_resumable", lambda resume, output_path: None)
    assert trainer._resume_checkpoint() is None and calls == []
