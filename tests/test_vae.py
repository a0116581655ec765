"""Parity of our AutoencoderKL with diffusers' ``AutoencoderKL``, through saved folders.

Tolerance (fp32): max |ours - reference| <= 1e-4 x max(1, max |reference|); measured about
5e-6 for encode, decode and tiled decode. Tiled and untiled decoding differ by construction
(GroupNorm statistics and the mid-block attention are per tile): with these random weights
the mean |tiled - untiled| is about 0.34 of the image's standard deviation (max 2.2 for a
peak of 3.5), for diffusers as for us, so that comparison only has a loose bound.
"""
import json
import os

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import Tensor

from pixart.models import autoencoder_kl as akl
from pixart.models import winograd
from pixart.models.autoencoder_kl import AutoencoderKL
from pixart.errors import ModelLoadError
from pixart.utils.safetensors_io import load_file, save_file
from tests.helpers_hf import assert_close

ms.set_context(mode=ms.PYNATIVE_MODE)
ms.set_device("CPU")

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32)


def save_vae(folder, seed=0, **overrides):
    """Save a random tiny diffusers VAE (every weight perturbed, norms included); return it."""
    from diffusers import AutoencoderKL as DiffusersVAE

    config = {**TINY, **overrides}
    n = len(config["block_out_channels"])
    torch.manual_seed(seed)
    model = DiffusersVAE(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         **config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(str(folder))
    return model


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    reference = save_vae(folder)
    return AutoencoderKL.from_pretrained(str(folder)), reference, folder


def images(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def latents(shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def reference_decode(reference, z):
    with torch.no_grad():
        return reference.decode(torch.tensor(z)).sample.numpy()


def test_encode_parity_non_square_batch(vae):
    ours, reference, _ = vae
    x = images((2, 3, 32, 48))
    with torch.no_grad():
        expected = reference.encode(torch.tensor(x)).latent_dist
    posterior = ours.encode(Tensor(x))
    assert posterior.mean.shape == (2, 4, 16, 24)
    assert_close(posterior.mean.asnumpy(), expected.mean.numpy())
    assert_close(posterior.logvar.asnumpy(), expected.logvar.numpy())
    assert_close(posterior.std.asnumpy(), expected.std.numpy())
    noise = latents((2, 4, 16, 24))
    assert_close(posterior.sample(noise).asnumpy(), (expected.mean + expected.std * torch.tensor(noise)).numpy())


def test_decode_parity_non_square_batch(vae):
    ours, reference, _ = vae
    z = latents((2, 4, 12, 20))
    out = ours.decode(Tensor(z)).asnumpy()
    assert out.shape == (2, 3, 24, 40) and out.dtype == np.float32
    assert_close(out, reference_decode(reference, z))


def test_a_repeated_small_decode_is_compiled(vae, monkeypatch):
    """The first decode of a shape runs eagerly, the next ones of a small shape compiled, with
    the same result; shapes above COMPILED_DECODE_ELEMENTS never compile."""
    ours, reference, _ = vae
    compiled, calls = ours._compiled_decode, []
    monkeypatch.setattr(ours, "_compiled_decode", lambda z: calls.append(tuple(z.shape)) or compiled(z))
    z = latents((3, 4, 6, 10))
    first, second = (ours.decode(Tensor(z)).asnumpy() for _ in range(2))
    assert calls == [(3, 4, 6, 10)]
    np.testing.assert_allclose(second, first, atol=1e-5)  # the compiled GroupNorm sums its variance in one pass
    assert_close(second, reference_decode(reference, z))
    monkeypatch.setattr(akl, "COMPILED_DECODE_ELEMENTS", 3 * 64 * 12 * 20 - 1)  # just below this shape's size
    for _ in range(2):
        ours.decode(Tensor(latents((3, 4, 6, 10), seed=2)))
    assert len(calls) == 1


def test_graph_mode_matches(vae):
    ours, reference, _ = vae
    x, z = images((1, 3, 16, 24)), latents((1, 4, 8, 12))

    @ms.jit
    def encode_decode(image, latent):
        return ours.encoder(image), ours.decoder(ours.post_quant_conv(latent))

    moments, decoded = encode_decode(Tensor(x), Tensor(z))
    with torch.no_grad():
        assert_close(moments.asnumpy(), reference.encoder(torch.tensor(x)).numpy())
    assert_close(decoded.asnumpy(), reference_decode(reference, z))


@pytest.mark.parametrize("shape, tile, overlap", [((1, 4, 20, 28), 8, 0.25), ((2, 4, 12, 17), 8, 0.25),
                                                  ((1, 4, 12, 12), 8, 0.5)])
def test_tiled_decode_equals_diffusers_tiled(vae, shape, tile, overlap):
    ours, reference, _ = vae
    z = latents(shape)
    reference.enable_tiling()
    reference.tile_latent_min_size, reference.tile_sample_min_size = tile, tile * 2
    reference.tile_overlap_factor = overlap
    try:
        expected = reference_decode(reference, z)
    finally:
        reference.disable_tiling()
    out = ours.decode(Tensor(z), tiled=True, tile_latent_size=tile, overlap=overlap).asnumpy()
    assert out.shape == (shape[0], 3, 2 * shape[2], 2 * shape[3])
    assert_close(out, expected)


def test_tiled_vs_untiled(vae):
    ours, _, _ = vae
    yy, xx = np.meshgrid(np.linspace(-1, 1, 64), np.linspace(-1, 1, 96), indexing="ij")
    smooth = np.stack([np.sin(3 * xx + yy), np.cos(2 * yy), xx * yy])[None].astype(np.float32)
    z = ours.encode(Tensor(smooth)).mean
    untiled = ours.decode(z).asnumpy()
    one_tile = ours.decode(z, tiled=True, tile_latent_size=48).asnumpy()  # this shape's second decode: compiled
    # compiled: batch-norm statistics and MindSpore's SiLU; eager: NumPy's norm and SiLU (max 1.2e-5 apart)
    np.testing.assert_allclose(one_tile, untiled, atol=2e-5)
    tiled = ours.decode(z, tiled=True, tile_latent_size=24).asnumpy()
    assert np.abs(tiled - untiled).mean() <= 0.5 * untiled.std()  # measured 0.34


def test_query_blocks_in_attention(vae, monkeypatch):
    ours, reference, _ = vae
    z = latents((1, 4, 12, 16))  # the decoder's mid block attends over 12 * 16 = 192 positions
    monkeypatch.setattr(akl, "_SCORES_BUDGET", 64 * 192)  # three blocks of 64 queries
    assert_close(ours.decode(Tensor(z)).asnumpy(), reference_decode(reference, z))


@pytest.mark.parametrize("im2col, bands", [(True, "few rows each"), (True, "one"), (False, "none")])
@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 1), (3, 2, 0), (1, 1, 0)])
def test_conv_matches_torch(monkeypatch, im2col, bands, kernel, stride, padding):
    if bands == "few rows each":
        monkeypatch.setattr(akl, "_IM2COL_BUDGET", 6 * 9 * 5 * 4)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 11, 13)).astype(np.float32)
    w = rng.standard_normal((5, 6, kernel, kernel)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    conv = akl.Conv2d(6, 5, kernel, stride, padding)
    conv.weight.set_data(Tensor(w))
    conv.bias.set_data(Tensor(b))
    conv.im2col = im2col
    expected = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(w), torch.tensor(b), stride, padding)
    assert_close(conv(Tensor(x)).asnumpy(), expected.numpy())


@pytest.mark.parametrize("shape, out_channels, band_pixels", [
    ((2, 5, 20, 12), 7, 96),     # bands of 8 rows: the last one, 4 rows, padded to full height
    ((1, 3, 8, 16), 1, 1 << 14),  # one band
    ((1, 6, 12, 4), 4, 1),        # the narrowest band, one tile high
])
def test_winograd_conv_matches_torch(monkeypatch, shape, out_channels, band_pixels):
    monkeypatch.setattr(winograd, "BAND_PIXELS", band_pixels)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((out_channels, shape[1], 3, 3)).astype(np.float32)
    b = rng.standard_normal(out_channels).astype(np.float32)
    expected = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(w), torch.tensor(b), padding=1).numpy()
    out = winograd.winograd_conv3x3(Tensor(x), Tensor(w), Tensor(b)).asnumpy()
    assert out.shape == expected.shape
    assert_close(out, expected)


def test_large_convs_take_winograd_when_eager(vae, monkeypatch):
    """With the size threshold at zero every eager 3x3 same-size conv on a multiple of 4 takes
    the Winograd path, and decode and encode still equal diffusers; a compiled encoder keeps
    im2col (the Winograd bands would unroll in its graph)."""
    ours, reference, _ = vae
    calls = []
    monkeypatch.setattr(akl, "WINOGRAD_MIN_ELEMENTS", 0)
    monkeypatch.setattr(winograd, "BAND_PIXELS", 64)
    conv = winograd.winograd_conv3x3
    monkeypatch.setattr(winograd, "winograd_conv3x3", lambda *args: calls.append(args[0].shape) or conv(*args))
    z = latents((2, 4, 8, 12), seed=5)  # a shape no other test decodes: runs eagerly
    assert_close(ours.decode(Tensor(z)).asnumpy(), reference_decode(reference, z))
    assert (2, 32, 16, 24) in calls  # the last up block's convs, at full size
    x = images((1, 3, 16, 24), seed=5)
    with torch.no_grad():
        expected_mean = reference.encode(torch.tensor(x)).latent_dist.mean.numpy()
        expected_moments = reference.encoder(torch.tensor(x)).numpy()
    assert_close(ours.encode(Tensor(x)).mean.asnumpy(), expected_mean)
    assert (1, 32, 16, 24) in calls
    eager_calls = len(calls)
    assert_close(ms.jit(ours.encoder)(Tensor(x)).asnumpy(), expected_moments)
    assert len(calls) == eager_calls


@pytest.mark.parametrize("shape, groups", [((2, 32, 8, 8), 8), ((3, 64, 6, 10), 32)])
def test_group_norm_with_batch_norm_statistics_matches_torch(shape, groups):
    """The batch-norm statistics of a compiled CPU decode equal torch's GroupNorm, as does the default."""
    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal(shape) + 1).astype(np.float32)
    norm = akl.GroupNorm(groups, shape[1])
    norm.weight.set_data(Tensor(rng.uniform(0.5, 1.5, shape[1]).astype(np.float32)))
    norm.bias.set_data(Tensor(rng.standard_normal(shape[1]).astype(np.float32)))
    expected = torch.nn.functional.group_norm(torch.tensor(x), groups, torch.tensor(norm.weight.asnumpy()),
                                              torch.tensor(norm.bias.asnumpy()), 1e-6).numpy()
    compiled = ms.jit(norm.construct)(Tensor(x), True).asnumpy()
    np.testing.assert_allclose(compiled, expected, atol=1e-5)
    np.testing.assert_allclose(norm(Tensor(x)).asnumpy(), expected, atol=1e-5)


@pytest.mark.parametrize("shape, groups, dtype", [((2, 32, 8, 8), 8, ms.float32), ((3, 64, 6, 10), 32, ms.float32),
                                                   ((1, 16, 4, 4), 4, ms.float16)])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_on_host_matches_torch(shape, groups, dtype, silu):
    """The NumPy GroupNorm (and SiLU) of an eager CPU decode equals torch's, keeps the input's
    dtype, and is what AutoencoderKL's GroupNorms run eagerly on CPU, the same as the compiled path."""
    rng = np.random.default_rng(1)
    x = (3 * rng.standard_normal(shape) + 1).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, shape[1]).astype(np.float32)
    bias = rng.standard_normal(shape[1]).astype(np.float32)
    out = akl.group_norm_on_host(Tensor(x).astype(dtype), groups, Tensor(weight), Tensor(bias), 1e-6, silu)
    assert out.dtype == dtype and out.shape == shape
    source = torch.tensor(Tensor(x).astype(dtype).astype(ms.float32).asnumpy())
    expected = torch.nn.functional.group_norm(source, groups, torch.tensor(weight), torch.tensor(bias), 1e-6)
    expected = (torch.nn.functional.silu(expected) if silu else expected).numpy()
    atol = 1e-5 if dtype == ms.float32 else 2e-2
    np.testing.assert_allclose(out.astype(ms.float32).asnumpy(), expected, atol=atol)
    norm = akl.GroupNorm(groups, shape[1], silu=silu)
    norm.weight.set_data(Tensor(weight))
    norm.bias.set_data(Tensor(bias))
    np.testing.assert_allclose(norm(Tensor(x).astype(dtype)).astype(ms.float32).asnumpy(), expected, atol=atol)
    norms = [cell for _, cell in AutoencoderKL(akl.AutoencoderKLConfig()).cells_and_names()
             if isinstance(cell, akl.GroupNorm)]
    assert norms and all(cell.on_host for cell in norms) and any(cell.silu for cell in norms)


def test_variant_config(tmp_path):
    """Three blocks, two resnets per block, no mid-block attention, no quant convs."""
    reference = save_vae(tmp_path, block_out_channels=(16, 32, 32), layers_per_block=2,
                         mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False)
    ours = AutoencoderKL.from_pretrained(str(tmp_path))
    x, z = images((1, 3, 32, 24)), latents((1, 4, 6, 10))
    with torch.no_grad():
        expected_mean = reference.encode(torch.tensor(x)).latent_dist.mean.numpy()
    assert_close(ours.encode(Tensor(x)).mean.asnumpy(), expected_mean)
    assert_close(ours.decode(Tensor(z)).asnumpy(), reference_decode(reference, z))


def test_old_attention_key_names(vae, tmp_path):
    ours, reference, folder = vae
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for name, array in load_file(str(folder / "diffusion_pytorch_model.safetensors")).items():
        for new, legacy in renames.items():
            name = name.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
        old[name] = array
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in old
    save_file(old, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    z = latents((1, 4, 8, 8))
    assert_close(AutoencoderKL.from_pretrained(str(tmp_path)).decode(Tensor(z)).asnumpy(),
                 reference_decode(reference, z))


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_config_values_and_force_upcast(tmp_path):
    save_vae(tmp_path)
    edit_config(tmp_path, scaling_factor=0.13025, shift_factor=None, force_upcast=True)
    vae = AutoencoderKL.from_pretrained(str(tmp_path), dtype=ms.float16)
    assert vae.scaling_factor == 0.13025 and vae.shift_factor == 0.0
    assert vae.compute_dtype == ms.float32 and vae.decoder.conv_in.weight.dtype == ms.float32
    edit_config(tmp_path, force_upcast=False, shift_factor=0.0609)
    vae = AutoencoderKL.from_pretrained(str(tmp_path), dtype=ms.float16)
    assert vae.shift_factor == 0.0609
    assert vae.compute_dtype == ms.float16 and vae.decoder.conv_in.weight.dtype == ms.float16
    assert vae.decoder.conv_norm_out.weight.dtype == ms.float32  # norms stay fp32


def test_missing_folder_and_weights(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        AutoencoderKL.from_pretrained(str(tmp_path / "nope"))
    save_vae(tmp_path)
    os.remove(tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ModelLoadError, match="expected diffusion_pytorch_model.safetensors"):
        AutoencoderKL.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("changes, message", [
    ({"block_out_channels": [32, 128]}, r"has shape .* in the weights but .* in the model built from config.json"),
    ({"layers_per_block": 2}, "missing .* tensor"),
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "only DownEncoderBlock2D"),
    ({"norm_num_groups": 7}, "does not divide"),
])
def test_config_does_not_match_weights(tmp_path, changes, message):
    save_vae(tmp_path)
    edit_config(tmp_path, **changes)
    with pytest.raises(ModelLoadError, match=message):
        AutoencoderKL.from_pretrained(str(tmp_path))


def test_bad_input_shapes(vae):
    ours, _, _ = vae
    with pytest.raises(ValueError, match="multiples of 2"):
        ours.encode(Tensor(images((1, 3, 15, 16))))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        ours.decode(Tensor(latents((1, 3, 8, 8))))
