"""sample.py end to end against diffusers' PixArtSigmaPipeline.

Tiny random diffusers components (transformer, VAE with the real 8x downsampling, T5
encoder) plus the real T5 tokenizer from ../shared are saved in the Hugging Face layout.
diffusers generates from given initial latents; our sample.py (after tools/convert.py)
runs through its CLI with the same latents; the PNGs must agree within 1/255 mean
absolute difference.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests import torch_pixart as ref
from tests.conftest import ROOT

PROMPTS = ["a red apple on a table", "an astronaut riding a horse on the moon, oil painting"]


def build_components(folder, tokenizer_dir, sample_size=8, seed=0):
    from diffusers import AutoencoderKL
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                                 dropout_rate=0.0)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4, layers_per_block=1,
                        block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256, scaling_factor=0.13025).eval()
    transformer = ref.build_diffusers(seed=seed, hidden=64, heads=4, depth=2, caption=32, sample_size=sample_size,
                                      interpolation_scale=sample_size / 64)
    t5.save_pretrained(folder / "text_encoder")
    vae.save_pretrained(folder / "vae")
    transformer.save_pretrained(folder / "transformer")
    return t5, vae, transformer


@pytest.fixture(scope="module")
def components(tmp_path_factory, shared_dir):
    folder = tmp_path_factory.mktemp("pixart-tiny")
    tokenizer_dir = os.path.join(shared_dir, "t5_tokenizer")
    t5, vae, transformer = build_components(folder, tokenizer_dir)
    ckpt = folder / "transformer.ckpt"
    subprocess.run([sys.executable, "tools/convert.py", "--source", str(folder / "transformer"),
                    "--target", str(ckpt), "--model_max_length", "300"], cwd=ROOT, check=True, capture_output=True)
    return dict(folder=folder, tokenizer_dir=tokenizer_dir, t5=t5, vae=vae, transformer=transformer, ckpt=ckpt)


def diffusers_pipeline(c, scheduler):
    from diffusers import PixArtSigmaPipeline
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(c["tokenizer_dir"])
    return PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=c["t5"], vae=c["vae"], transformer=c["transformer"],
                               scheduler=scheduler)


def dpm_scheduler():
    from diffusers import DPMSolverMultistepScheduler
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", solver_order=2,
        prediction_type="epsilon", algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
        use_karras_sigmas=False, timestep_spacing="linspace", steps_offset=0, thresholding=False)


def run_sample_py(c, tmp_path, latents, height, width, *extra):
    np.save(tmp_path / "latents.npy", latents)
    out = tmp_path / "out"
    cmd = [sys.executable, "sample.py", "--checkpoint", str(c["ckpt"]), "--vae_root", str(c["folder"] / "vae"),
           "--text_encoder_root", str(c["folder"] / "text_encoder"), "--tokenizer_root", c["tokenizer_dir"],
           "--latents", str(tmp_path / "latents.npy"), "--image_height", str(height), "--image_width", str(width),
           "--output_path", str(out), "--batch_size", "2", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    files = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    return [np.asarray(Image.open(out / f).convert("RGB")) for f in files], proc.stdout


def assert_images_close(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        mad = np.abs(a.astype(np.float64) - b.astype(np.float64)).mean()
        assert mad <= 1.0, f"mean abs difference {mad:.3f}/255 > 1/255"


@pytest.mark.parametrize("height,width,negative", [(64, 64, ""), (64, 96, ""), (64, 64, "blurry, low quality"), (64, 96, "blurry, low quality")])
def test_dpm_matches_pixart_sigma_pipeline(components, tmp_path, height, width, negative):
    c = components
    latents = np.random.default_rng(1).standard_normal((2, 4, height // 8, width // 8)).astype(np.float32)
    pipe = diffusers_pipeline(c, dpm_scheduler())
    expected = pipe(PROMPTS, negative_prompt=negative, height=height, width=width, num_inference_steps=10,
                    guidance_scale=4.5, latents=torch.from_numpy(latents), output_type="pil",
                    use_resolution_binning=False, clean_caption=False, max_sequence_length=300).images
    ours, stdout = run_sample_py(c, tmp_path, latents, height, width, "--prompt", *PROMPTS,
                                 "--negative_prompt", negative, "--sampling_method", "dpm", "--sampling_steps", "10",
                                 "--guidance_scale", "4.5", "--use_resolution_binning", "False")
    assert_images_close(ours, [np.asarray(im) for im in expected])
    assert "s/step" in stdout
