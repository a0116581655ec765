"""tools/convert.py: bad inputs, safety of the .pth reader, the reverse direction."""
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import torch
from diffusers import PixArtTransformer2DModel

from pixart.utils import torch_pickle
from pixart.utils.safetensors_io import load_file, save_file
from tests import torch_pixart as ref
from tests.conftest import ROOT
from tools import convert


def official_pth(tmp_path, **kwargs):
    model = ref.build_diffusers(sample_size=8)
    sd = ref.official_state_dict(model, y_embedding_tokens=6, caption=32)
    sd.update(kwargs)
    path = tmp_path / "model.pth"
    torch.save({"state_dict": sd}, path)
    return model, sd, path


def test_pth_reader_matches_torch_load(tmp_path):
    tensors = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(), "f16": torch.randn(2, 2).half(),
               "i64": torch.arange(6).reshape(2, 3), "view": torch.randn(4, 6)[1:, ::2], "scalar": torch.tensor(2.5)}
    path = tmp_path / "t.pth"
    torch.save({"state_dict": tensors, "epoch": 7, "nested": {"a": [1, 2]}}, path)
    loaded = torch_pickle.load(str(path))
    assert loaded["epoch"] == 7 and loaded["nested"] == {"a": [1, 2]}
    for name, t in tensors.items():
        np.testing.assert_array_equal(loaded["state_dict"][name], t.float().numpy() if name == "bf16" else t.numpy())


def test_pth_reader_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"state_dict": {"x": Evil()}}, protocol=2))
    loaded = torch_pickle.load(str(path))
    assert not marker.exists()
    assert isinstance(loaded["state_dict"]["x"], torch_pickle.Placeholder)
    target = tmp_path / "out.ckpt"
    assert convert.main(["--source", str(path), "--target", str(target)]) == 1
    assert not target.exists() and not marker.exists()


def test_convert_works_without_torch(tmp_path):
    _, _, path = official_pth(tmp_path)
    target = tmp_path / "model.ckpt"
    code = ("import sys, runpy; sys.modules['torch'] = None; "  # any `import torch` now raises
            f"sys.argv = ['convert.py', '--source', {str(path)!r}, '--target', {str(target)!r}, '--num_heads', '4']; "
            "runpy.run_path('tools/convert.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "depth 2, hidden 64, 4 heads" in proc.stdout and target.exists()


def expect_failure(capsys, tmp_path, source, *needles, extra=()):
    target = tmp_path / "out.ckpt"
    assert convert.main(["--source", str(source), "--target", str(target), *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    assert not target.exists() and not any(p.name.startswith("out.ckpt") for p in tmp_path.iterdir())
    return err


def test_shape_mismatch_names_the_key(tmp_path, capsys):
    _, sd, _ = official_pth(tmp_path)
    sd["blocks.1.mlp.fc2.weight"] = torch.zeros(64, 100)
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": sd}, bad)
    expect_failure(capsys, tmp_path, bad, "blocks.1.mlp.fc2.weight", "shape mismatch", extra=["--num_heads", "4"])


def test_missing_and_unexpected_keys(tmp_path, capsys):
    _, sd, _ = official_pth(tmp_path)
    del sd["blocks.0.cross_attn.proj.bias"]
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    expect_failure(capsys, tmp_path, bad, "missing: blocks.0.cross_attn.proj.bias", "unexpected: blocks.0.extra.weight",
                   extra=["--num_heads", "4"])


def test_truncated_files(tmp_path, capsys):
    _, _, path = official_pth(tmp_path)
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    expect_failure(capsys, tmp_path, cut, "cut.pth")
    tensors = {"x_embedder.proj.weight": np.zeros((8, 4, 2, 2), np.float32)}
    st = tmp_path / "cut.safetensors"
    save_file(tensors, str(st))
    st.write_bytes(st.read_bytes()[:-10])
    expect_failure(capsys, tmp_path, st, "truncated")


def test_other_model_is_refused(tmp_path, capsys):
    other = tmp_path / "unet.safetensors"
    save_file({"conv_in.weight": np.zeros((32, 4, 3, 3), np.float32),
               "down_blocks.0.resnets.0.conv1.weight": np.zeros((32, 32, 3, 3), np.float32)}, str(other))
    expect_failure(capsys, tmp_path, other, "not a PixArt transformer checkpoint", "x_embedder.proj.weight")
    expect_failure(capsys, tmp_path, tmp_path / "absent.pth", "no such file")


def test_official_safetensors(tmp_path):
    model, sd, _ = official_pth(tmp_path)
    path = tmp_path / "official.safetensors"
    save_file({k: v.numpy() for k, v in sd.items()}, str(path))
    target = tmp_path / "model.ckpt"
    assert convert.main(["--source", str(path), "--target", str(target), "--num_heads", "4",
                         "--input_size", "8", "--pe_interpolation", "1"]) == 0
    from pixart.models.pixart_checkpoint import load_pixart
    from tests.test_pixart_transformer import assert_close, run_ours
    ours, _ = load_pixart(str(target))
    x, t, y, mask = ref.make_inputs()
    assert_close(run_ours(ours, x, t, y, mask), ref.run_diffusers(model, x, t, y, mask))


def test_reverse_ckpt_to_diffusers_folder(tmp_path):
    model = ref.build_diffusers(sample_size=8, micro=True, hidden=48)
    folder = tmp_path / "transformer"
    model.save_pretrained(folder)
    ckpt = tmp_path / "model.ckpt"
    assert convert.main(["--source", str(folder), "--target", str(ckpt), "--model_max_length", "6"]) == 0
    out = tmp_path / "exported"
    assert convert.main(["--source", str(ckpt), "--target", str(out)]) == 0
    back = PixArtTransformer2DModel.from_pretrained(out).eval()
    original = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    exported = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert sorted(original) == sorted(exported)
    for key in original:
        np.testing.assert_array_equal(original[key], exported[key])
    x, t, y, mask = ref.make_inputs(height=8, width=10)
    res, ar = np.array([[64, 80]] * 2, np.float32), np.array([[0.8]] * 2, np.float32)
    np.testing.assert_array_equal(ref.run_diffusers(back, x, t, y, mask, res, ar),
                                  ref.run_diffusers(model, x, t, y, mask, res, ar))


def test_help():
    proc = subprocess.run([sys.executable, "tools/convert.py", "-h"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "--source" in proc.stdout and "--ema" in proc.stdout


def test_a_dtype_weights_cannot_be_stored_in_is_refused_before_reading(tmp_path):
    proc = subprocess.run([sys.executable, "tools/convert.py", "--source", str(tmp_path / "absent.pth"), "--target",
                           str(tmp_path / "out.ckpt"), "--dtype", "auto"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "argument --dtype: invalid choice: 'auto'" in proc.stderr.strip().splitlines()[-1]  # after the usage
    assert list(tmp_path.iterdir()) == []
