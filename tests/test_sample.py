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

PROMPTS = ["a red apple on a table", "An Astronaut riding a horse on the Moon, oil painting "]


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


@pytest.mark.parametrize("height,width,negative,mode", [(64, 64, "", "graph"), (64, 96, "", "streamed"),
                                                        (64, 64, "blurry, low quality", "streamed"),
                                                        (64, 96, "blurry, low quality", "graph")])
def test_dpm_matches_pixart_sigma_pipeline(components, tmp_path, height, width, negative, mode):
    c = components
    latents = np.random.default_rng(1).standard_normal((2, 4, height // 8, width // 8)).astype(np.float32)
    pipe = diffusers_pipeline(c, dpm_scheduler())
    expected = pipe(PROMPTS, negative_prompt=negative, height=height, width=width, num_inference_steps=10,
                    guidance_scale=4.5, latents=torch.from_numpy(latents), output_type="pil",
                    use_resolution_binning=False, clean_caption=False, max_sequence_length=300).images
    ours, stdout = run_sample_py(c, tmp_path, latents, height, width, "--prompt", *PROMPTS,
                                 "--negative_prompt", negative, "--sampling_method", "dpm", "--sampling_steps", "10",
                                 "--guidance_scale", "4.5", "--use_resolution_binning", "False", "--mode", mode)
    assert_images_close(ours, [np.asarray(im) for im in expected])
    assert "s/step" in stdout


def official_respacing(num_steps, num_timesteps=1000):
    """IDDPM ``space_timesteps(1000, str(num_steps))``, written out."""
    stride = 1 if num_steps <= 1 else (num_timesteps - 1) / (num_steps - 1)
    taken, cur = [], 0.0
    for _ in range(num_steps):
        taken.append(round(cur))
        cur += stride
    return sorted(set(taken), reverse=True)


def reference_ddim_loop(c, latents, height, width, steps, guidance):
    """DDIM (eta 0) with the official semantics: each step moves to the next timestep used."""
    pipe = diffusers_pipeline(c, dpm_scheduler())
    pos, pos_mask, neg, neg_mask = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True, negative_prompt="",
                                                      max_sequence_length=300, clean_caption=False)
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    alphas_cumprod = np.cumprod(1.0 - betas)
    timesteps = official_respacing(steps)
    x = torch.from_numpy(latents).double()
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            model_in = torch.cat([x, x]).float()
            out = c["transformer"](model_in, encoder_hidden_states=torch.cat([neg, pos]),
                                   encoder_attention_mask=torch.cat([neg_mask, pos_mask]),
                                   timestep=torch.tensor([t, t, t, t]), added_cond_kwargs={"resolution": None,
                                                                                           "aspect_ratio": None},
                                   return_dict=False)[0]
            uncond, cond = out.chunk(2)
            eps = (uncond + guidance * (cond - uncond))[:, :4].double()
            a_t = alphas_cumprod[t]
            a_prev = alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
            x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
            x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
        image = c["vae"].decode(x.float() / c["vae"].config.scaling_factor).sample
    image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return [(im * 255).round().astype(np.uint8) for im in image]


def test_ddim_matches_official_semantics(components, tmp_path):
    c = components
    latents = np.random.default_rng(2).standard_normal((2, 4, 8, 10)).astype(np.float32)
    steps = 7  # 1000 is not divisible by 7: diffusers' DDIMScheduler would step elsewhere
    expected = reference_ddim_loop(c, latents, 64, 80, steps, 4.5)
    ours, _ = run_sample_py(c, tmp_path, latents, 64, 80, "--prompt", *PROMPTS, "--sampling_method", "ddim",
                            "--sampling_steps", str(steps), "--use_resolution_binning", "False")
    assert_images_close(ours, expected)


def test_iddpm_seeded_metadata_and_no_overwrite(components, tmp_path):
    c = components
    base = ["--checkpoint", str(c["ckpt"]), "--vae_root", str(c["folder"] / "vae"), "--text_encoder_root",
            str(c["folder"] / "text_encoder"), "--tokenizer_root", c["tokenizer_dir"], "--image_height", "64",
            "--image_width", "64", "--sampling_method", "iddpm", "--sampling_steps", "8", "--seed", "5",
            "--output_path", str(tmp_path / "out"), "--use_resolution_binning", "False"]
    for extra in (["--prompt", PROMPTS[0], "--num_trials", "2", "--imagegrid", "True"], ["--prompt", PROMPTS[0]]):
        proc = subprocess.run([sys.executable, "sample.py", *base, *extra], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(os.listdir(tmp_path / "out"))
    assert len(files) == 4 and files[2].startswith("00002-grid")
    first, second, _, rerun = (tmp_path / "out" / f for f in files)
    meta = Image.open(first).text
    assert meta["prompt"] == PROMPTS[0] and meta["seed"] == "5" and meta["sampling_method"] == "iddpm"
    assert meta["sampling_steps"] == "8" and meta["guidance_scale"] == "4.5" and meta["checkpoint"] == "transformer.ckpt"
    assert Image.open(second).text["seed"] == "6"
    a, b, r = (np.asarray(Image.open(p)) for p in (first, second, rerun))
    assert np.array_equal(a, r), "the same seed must give the same image, alone or in a batch"
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1, "different seeds gave the same image"


def test_resolution_binning_matches_diffusers(tmp_path, shared_dir):
    folder = tmp_path / "c"
    tokenizer_dir = os.path.join(shared_dir, "t5_tokenizer")
    t5, vae, transformer = build_components(folder, tokenizer_dir, sample_size=32)
    ckpt = folder / "transformer.ckpt"
    subprocess.run([sys.executable, "tools/convert.py", "--source", str(folder / "transformer"), "--target",
                    str(ckpt), "--model_max_length", "300"], cwd=ROOT, check=True, capture_output=True)
    c = dict(folder=folder, tokenizer_dir=tokenizer_dir, t5=t5, vae=vae, transformer=transformer, ckpt=ckpt)
    from diffusers.image_processor import PixArtImageProcessor
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_256_BIN

    height, width = 200, 300  # sampled at the nearest bucket of the 256 table, then resized and cropped back
    bin_h, bin_w = PixArtImageProcessor.classify_height_width_bin(height, width, ASPECT_RATIO_256_BIN)
    assert (bin_h, bin_w) != (height, width)
    latents = np.random.default_rng(3).standard_normal((2, 4, bin_h // 8, bin_w // 8)).astype(np.float32)
    pipe = diffusers_pipeline(c, dpm_scheduler())
    expected = pipe(PROMPTS, height=height, width=width, num_inference_steps=4, guidance_scale=3.0,
                    latents=torch.from_numpy(latents), output_type="pil", use_resolution_binning=True,
                    clean_caption=False, max_sequence_length=300).images
    ours, stdout = run_sample_py(c, tmp_path, latents, height, width, "--prompt", *PROMPTS, "--sampling_steps", "4",
                                 "--guidance_scale", "3.0")
    assert f"sampled at {bin_h}x{bin_w}" in stdout
    assert_images_close(ours, [np.asarray(im) for im in expected])


def run_cli(*args):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_bad_inputs_get_clear_messages(components, tmp_path):
    c = components
    models = ["--checkpoint", str(c["ckpt"]), "--vae_root", str(c["folder"] / "vae"), "--text_encoder_root",
              str(c["folder"] / "text_encoder"), "--tokenizer_root", c["tokenizer_dir"]]
    proc = run_cli("--prompt", "x", "--checkpoint", "models/none.ckpt", *models[2:])
    assert proc.returncode == 1 and "does not exist" in proc.stderr and "tools/convert.py" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("--prompt", "x", *models[:2], "--vae_root", str(tmp_path / "novae"), *models[4:])
    assert proc.returncode == 1 and "models/vae" in proc.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    proc = run_cli("--prompt_path", str(empty), *models)
    assert proc.returncode == 1 and "no prompts" in proc.stderr
    proc = run_cli("--prompt", "x", "--sampling_method", "euler", *models)
    assert proc.returncode == 2 and "invalid choice: 'euler'" in proc.stderr
    proc = run_cli("--prompt", "x", "--image_height", "100", "--image_width", "64", "--use_resolution_binning", "False",
                   *models)
    assert proc.returncode == 1 and "multiples of 16" in proc.stderr and "Traceback" not in proc.stderr
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("sampling_steps: 10\nguidance: 3\n")
    proc = run_cli("-c", str(cfg), "--prompt", "x", *models)
    assert proc.returncode == 2 and "unknown key(s) guidance" in proc.stderr
    proc = run_cli()
    assert proc.returncode == 1 and "--checkpoint is not set" in proc.stderr
    proc = run_cli(*models)
    assert proc.returncode == 1 and "no prompt" in proc.stderr


def test_help_lists_every_flag():
    proc = run_cli("-h")
    for flag in ("--checkpoint", "--vae_root", "--text_encoder_root", "--tokenizer_root", "--prompt", "--prompt_path",
                 "--negative_prompt", "--batch_size", "--num_trials", "--image_height", "--image_width",
                 "--use_resolution_binning", "--sampling_method", "--sampling_steps", "--guidance_scale", "--seed",
                 "--latents", "--dtype", "--output_path", "--imagegrid"):
        assert flag in proc.stdout, flag


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "configs", "inference"))))
def test_inference_configs_parse(name):
    from pixart.cli import parse_with_config
    from pixart.cli.inference import build_parser

    args = parse_with_config(build_parser(""), ["-c", os.path.join(ROOT, "configs", "inference", name),
                                                     "--prompt", "x"])
    assert args.checkpoint.startswith("models/") and args.image_height % 8 == 0
    if name.startswith("dit-"):  # class-conditional: class ids and names, no T5
        assert args.class_labels and os.path.isfile(os.path.join(ROOT, args.class_names))
        return
    assert args.sampling_method == ("lcm" if "lcm" in name else "dpm") and args.model_max_length in (16, 120, 300)


def test_prompt_file_on_command_line_replaces_config_prompts(tmp_path):
    from pixart.cli import parse_with_config
    from pixart.cli.inference import build_parser, read_prompts

    config = os.path.join(ROOT, "configs", "inference", "pixart-digits.yaml")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("seven\n\nthe digit 3\n")

    def read(*argv):
        parser = build_parser("")
        return read_prompts(parse_with_config(parser, ["-c", config, *argv]), parser)

    assert len(read()) == 10  # the config's examples
    assert read("--prompt_path", str(prompts)) == ["seven", "the digit 3"]
    assert read("--prompt", "one", "--prompt_path", str(prompts)) == ["one", "seven", "the digit 3"]


def test_denoiser_compiles_once_per_shape(components):
    """Steps, seeds, prompts and guidance values reuse one graph; a new shape adds one."""
    from mindspore.graph import api

    from pixart.models.autoencoder_kl import AutoencoderKL
    from pixart.models.pixart_checkpoint import load_pixart
    from pixart.pipelines.text_to_image import PixArtPipeline, TextEmbeddings

    c = components
    model, _ = load_pixart(str(c["ckpt"]))
    pipe = PixArtPipeline(model, AutoencoderKL.from_pretrained(str(c["folder"] / "vae")))
    rng = np.random.default_rng(0)

    def text(n):
        return TextEmbeddings(rng.standard_normal((n, 300, 32)).astype(np.float32), np.ones((n, 300), np.int64))

    pipe(text(1), text(1), 64, 64, sampling_steps=3, guidance_scale=4.5, seeds=[0], use_resolution_binning=False,
         progress=False)
    compiled = len(api.ms_compile_cache)
    for steps, guidance, seed in ((5, 2.0, 1), (4, 7.5, 2)):
        pipe(text(1), text(1), 64, 64, sampling_method="ddim", sampling_steps=steps, guidance_scale=guidance, seeds=[seed],
             use_resolution_binning=False, progress=False)
    assert len(api.ms_compile_cache) == compiled
    pipe(text(1), text(1), 64, 96, sampling_steps=2, seeds=[0], use_resolution_binning=False, progress=False)
    assert len(api.ms_compile_cache) == compiled + 1


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_lcm_one_step_matches_pixart_sigma_pipeline(components, tmp_path, guidance):
    """One LCM step from given latents (no step noise), without and with classifier-free guidance."""
    from tests.test_samplers import lcm_scheduler

    c = components
    latents = np.random.default_rng(4).standard_normal((2, 4, 8, 8)).astype(np.float32)
    pipe = diffusers_pipeline(c, lcm_scheduler())
    expected = pipe(PROMPTS, height=64, width=64, num_inference_steps=1, guidance_scale=guidance,
                    latents=torch.from_numpy(latents), output_type="pil", use_resolution_binning=False,
                    clean_caption=False, max_sequence_length=300).images
    ours, _ = run_sample_py(c, tmp_path, latents, 64, 64, "--prompt", *PROMPTS, "--sampling_method", "lcm",
                            "--sampling_steps", "1", "--guidance_scale", str(guidance),
                            "--use_resolution_binning", "False")
    assert_images_close(ours, [np.asarray(im) for im in expected])
