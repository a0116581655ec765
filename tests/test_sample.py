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


def model_flags(c, checkpoint=None):
    """The four model flags of the tiny components (the converted .ckpt unless ``checkpoint``)."""
    return ["--checkpoint", str(checkpoint or c["ckpt"]), "--vae_root", str(c["folder"] / "vae"),
            "--text_encoder_root", str(c["folder"] / "text_encoder"), "--tokenizer_root", c["tokenizer_dir"]]


def run_sample_py(c, tmp_path, latents, height, width, *extra, models=None, env=None):
    """sample.py from ``latents`` with ``models`` (default: ``model_flags(c)``) -> (images, stdout)."""
    np.save(tmp_path / "latents.npy", latents)
    out = tmp_path / "out"
    cmd = [sys.executable, "sample.py", *(model_flags(c) if models is None else models),
           "--latents", str(tmp_path / "latents.npy"), "--image_height", str(height), "--image_width", str(width),
           "--output_path", str(out), "--batch_size", "2", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
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
    for flags, message in ((["--attention", "flash"], "--attention flash cannot run here: flash attention runs on "
                                                      "Ascend NPUs only, not on CPU"),
                           (["--jit_level", "O2"], "--jit_level O2 (the GE backend) runs on Ascend only"),
                           (["--max_device_memory", "lots"], "expected a size such as 58GB"),
                           (["--dtype", "fp16"], "--dtype fp16 is not supported on CPU")):
        proc = run_cli("--prompt", "x", *flags, *models)
        assert proc.returncode == 1 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
            proc.stderr


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
        assert args.dtype == ("fp32" if name == "dit-xl-2-256.yaml" else "auto")  # DiT's authors sampled in fp32
        assert args.class_labels and os.path.isfile(os.path.join(ROOT, args.class_names))
        return
    assert args.sampling_method == ("lcm" if "lcm" in name else "dpm") and args.model_max_length in (16, 120, 300)
    assert args.dtype == "auto"  # the authors' fp16 on Ascend/GPU, fp32 on CPU


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
    """Steps, seeds, prompts and guidance values reuse one graph; a new shape adds one (its
    decode compiles only if that shape comes again)."""
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

    for seed in (0, 3):  # the VAE decode compiles when its shape comes the second time
        pipe(text(1), text(1), 64, 64, sampling_steps=3, guidance_scale=4.5, seeds=[seed], use_resolution_binning=False,
             progress=False)
    compiled = len(api.ms_compile_cache)
    for steps, guidance, seed in ((5, 2.0, 1), (4, 7.5, 2)):
        pipe(text(1), text(1), 64, 64, sampling_method="ddim", sampling_steps=steps, guidance_scale=guidance, seeds=[seed],
             use_resolution_binning=False, progress=False)
    assert len(api.ms_compile_cache) == compiled
    pipe(text(1), text(1), 64, 96, sampling_steps=2, seeds=[0], use_resolution_binning=False, progress=False)
    assert len(api.ms_compile_cache) == compiled + 1


def test_trimmed_captions_leave_the_guided_output_unchanged():
    """The padding that every caption of a batch has is cut to a 64-token step before the
    transformer sees it (``unpadded_length``, tested with the tokenizer): the guided output
    equals the full 300-token one, and caption lengths in one step share a compiled graph."""
    from mindspore import Tensor
    from mindspore.graph import api

    from pixart.models.pixart import Conditioning, PixArtConfig, build_model
    from pixart.pipelines.text_to_image import GuidedDenoiser, TextEmbeddings
    from tests.test_tokenizer import kept_mask

    rng = np.random.default_rng(0)
    model = build_model(PixArtConfig(input_size=8, depth=2, hidden_size=64, num_heads=4, caption_channels=32))
    for p in model.get_parameters():  # every path non-trivial (zero-initialised projections included)
        p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.05))
    model.set_train(False)
    embeddings = rng.standard_normal((2, 300, 32)).astype(np.float32)

    def text(*kept):
        return TextEmbeddings(embeddings, kept_mask(*kept))

    trimmed = text(1, (3, 100)).trimmed()
    np.testing.assert_array_equal(trimmed.embeddings, embeddings[:, :128])
    np.testing.assert_array_equal(trimmed.mask, text(1, (3, 100)).mask[:, :128])

    denoiser = GuidedDenoiser(model, "graph")
    latents = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    compiled = len(api.ms_compile_cache)
    for kept in [(1, 40), (3, 63), (2, (7, 120))]:
        full = text(*kept)
        whole = denoiser(latents, 500, Conditioning.of(full.embeddings, full.mask), 4.5)
        cut = denoiser(latents, 500, full.conditioning(64, 64), 4.5)
        np.testing.assert_allclose(cut, whole, rtol=0, atol=1e-6)
        assert np.abs(whole).max() > 0.1
    assert len(api.ms_compile_cache) == compiled + 3  # 300 tokens, then 64 twice, then 128


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


# ------------------------------------------------------------------ weights where diffusers users keep them

def tree(folder):
    """Every file under ``folder`` with its size and modification time."""
    return sorted((os.path.join(root, name), os.stat(os.path.join(root, name)).st_mtime_ns,
                   os.stat(os.path.join(root, name)).st_size) for root, _, names in os.walk(folder) for name in names)


def save_pipeline_index(folder, parts=("transformer", "vae", "text_encoder", "tokenizer")):
    """``model_index.json`` of a diffusers PixArt-Σ pipeline saved in ``folder``."""
    import json

    index = {"_class_name": "PixArtSigmaPipeline", "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}
    kinds = {"transformer": ["diffusers", "PixArtTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"]}
    index.update({part: kinds[part] for part in parts})
    (folder / "model_index.json").write_text(json.dumps(index))


def test_diffusers_folders_as_checkpoint_give_the_converted_image(components, tmp_path):
    """--checkpoint takes a diffusers transformer/ folder, or the pipeline folder holding it (here with
    sharded weights and their index), converted in memory: the images are the converted .ckpt's, and
    nothing is written beside the folders."""
    c = components
    pipeline = tmp_path / "pipeline"
    c["transformer"].save_pretrained(pipeline / "transformer", max_shard_size="100KB")
    assert len(list((pipeline / "transformer").glob("*.safetensors"))) > 1
    assert (pipeline / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    save_pipeline_index(pipeline, ("transformer",))
    before = tree(c["folder"]), tree(pipeline)
    latents = np.random.default_rng(5).standard_normal((1, 4, 8, 8)).astype(np.float32)
    common = ("--prompt", PROMPTS[0], "--sampling_steps", "3", "--use_resolution_binning", "False")
    images = {}
    for name, checkpoint in (("ckpt", c["ckpt"]), ("folder", c["folder"] / "transformer"), ("pipeline", pipeline)):
        (tmp_path / f"run-{name}").mkdir()
        images[name], _ = run_sample_py(c, tmp_path / f"run-{name}", latents, 64, 64, *common,
                                        models=model_flags(c, checkpoint))
    assert len(images["ckpt"]) == 1 and images["ckpt"][0].std() > 0
    assert np.array_equal(images["folder"][0], images["ckpt"][0])
    assert np.array_equal(images["pipeline"][0], images["ckpt"][0])
    assert (tree(c["folder"]), tree(pipeline)) == before


def link_into_hub_cache(hub, repo_id, snapshot, commit="0123456789abcdef0123456789abcdef01234567"):
    """Lay ``snapshot`` (a folder) out as huggingface_hub caches a download: each file a blob named
    by its hash, linked from snapshots/COMMIT/, and refs/main naming the commit. Returns the
    snapshot folder in the cache."""
    import hashlib
    import shutil

    model_dir = hub / ("models--" + repo_id.replace("/", "--"))
    target = model_dir / "snapshots" / commit
    (model_dir / "blobs").mkdir(parents=True)
    for root, _, names in os.walk(snapshot):
        for name in names:
            source = os.path.join(root, name)
            with open(source, "rb") as f:
                blob = model_dir / "blobs" / hashlib.sha256(f.read()).hexdigest()
            shutil.copyfile(source, blob)
            link = target / os.path.relpath(source, snapshot)
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(blob, link.parent), link)
    (model_dir / "refs").mkdir()
    (model_dir / "refs" / "main").write_text(commit)
    return target


@pytest.fixture(scope="module")
def hub_cache(components, tmp_path_factory):
    """A Hugging Face hub cache holding the tiny components as the pipeline "tiny-org/pixart-tiny"."""
    import shutil

    c = components
    pipeline = tmp_path_factory.mktemp("pipeline")
    for part in ("transformer", "vae", "text_encoder"):
        shutil.copytree(c["folder"] / part, pipeline / part)
    shutil.copytree(c["tokenizer_dir"], pipeline / "tokenizer")
    save_pipeline_index(pipeline)
    hub = tmp_path_factory.mktemp("hub")
    snapshot = link_into_hub_cache(hub, "tiny-org/pixart-tiny", pipeline)
    return dict(hub=hub, snapshot=snapshot, env=dict(os.environ, HF_HUB_CACHE=str(hub)))


def test_pretrained_from_the_hub_cache_equals_the_folders_given(components, hub_cache, tmp_path):
    """--pretrained ID fills the model flags from the cached snapshot, in place of the config's paths:
    the image is the one of the folders given explicitly; a model flag on the command line wins."""
    c = components
    latents = np.random.default_rng(6).standard_normal((1, 4, 8, 8)).astype(np.float32)
    common = ("--prompt", PROMPTS[1], "--sampling_steps", "3", "--use_resolution_binning", "False")
    config = tmp_path / "elsewhere.yaml"  # model paths that do not exist: --pretrained replaces them
    config.write_text("checkpoint: models/none.ckpt\nvae_root: models/none\ntext_encoder_root: models/none\n"
                      "tokenizer_root: models/none\n")
    runs = {"explicit": model_flags(c, c["folder"] / "transformer"),
            "pretrained": ["-c", str(config), "--pretrained", "tiny-org/pixart-tiny"],
            "ckpt wins": ["--pretrained", "tiny-org/pixart-tiny", "--checkpoint", str(c["ckpt"])]}
    images, checkpoints = {}, {}
    for name, models in runs.items():
        (tmp_path / name).mkdir()
        images[name], _ = run_sample_py(c, tmp_path / name, latents, 64, 64, *common, models=models,
                                        env=hub_cache["env"])
        png = next(p for p in os.listdir(tmp_path / name / "out") if p.endswith(".png"))
        checkpoints[name] = Image.open(tmp_path / name / "out" / png).text["checkpoint"]
    assert np.array_equal(images["pretrained"][0], images["explicit"][0])
    assert np.array_equal(images["ckpt wins"][0], images["explicit"][0])
    assert checkpoints == {"explicit": "transformer", "pretrained": "transformer", "ckpt wins": "transformer.ckpt"}


def test_pretrained_fills_only_the_flags_not_given(hub_cache, monkeypatch):
    """In process: the parts come from the snapshot, a flag on the command line stays, the web demo
    takes --pretrained as naming the model (no bundled default config), train.py's flags fill the
    same way, and a DiT pipeline (no text encoder in its model_index.json) asks for no T5."""
    import gradio_demo
    from pixart.cli import parse_with_config
    from pixart.cli.inference import build_parser
    from pixart.utils.hf_cache import apply_pretrained, pretrained_parts

    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache["hub"]))
    snapshot = hub_cache["snapshot"]
    argv = ["--pretrained", "tiny-org/pixart-tiny", "--vae_root", "my/vae"]
    args = parse_with_config(build_parser(""), argv)
    apply_pretrained(args, argv)
    assert (args.checkpoint, args.vae_root, args.text_encoder_root, args.tokenizer_root) == (
        str(snapshot / "transformer"), "my/vae", str(snapshot / "text_encoder"), str(snapshot / "tokenizer"))
    demo = gradio_demo.parse_args(["--pretrained", "tiny-org/pixart-tiny"])
    assert demo.checkpoint == str(snapshot / "transformer") and demo.prompt is None
    from pixart.cli.training import build_parser as build_training_parser
    from pixart.training.config import TrainConfig

    argv = ["--pretrained", "tiny-org/pixart-tiny", "--tokenizer_root", "my/tokenizer"]  # train.py's flags
    train = parse_with_config(build_training_parser(""), argv)
    apply_pretrained(train, argv)
    cfg = TrainConfig.from_namespace(train)
    assert (cfg.checkpoint, cfg.vae_root, cfg.text_encoder_root, cfg.tokenizer_root) == (
        str(snapshot / "transformer"), str(snapshot / "vae"), str(snapshot / "text_encoder"), "my/tokenizer")

    dit = snapshot.parent.parent.parent / "dit-pipeline"
    (dit / "transformer").mkdir(parents=True)
    (dit / "transformer" / "config.json").write_text("{}")
    (dit / "transformer" / "diffusion_pytorch_model.safetensors").write_text("")
    (dit / "model_index.json").write_text('{"_class_name": "DiTPipeline", "transformer": [], "vae": []}')
    with pytest.raises(ValueError, match=r"lacks vae/ \(--vae_root\);"):
        pretrained_parts(str(dit), ["checkpoint", "vae_root", "text_encoder_root", "tokenizer_root"])
    assert pretrained_parts(str(dit), ["checkpoint", "text_encoder_root", "tokenizer_root"]) == {
        "checkpoint": str(dit / "transformer")}


def test_pretrained_not_cached_or_incomplete_is_one_clear_line(hub_cache, tmp_path):
    import shutil

    prompt = ["--prompt", "x", "--output_path", str(tmp_path / "out")]
    empty = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    proc = subprocess.run([sys.executable, "sample.py", "--pretrained", "tiny-org/pixart-tiny", *prompt], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=empty)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "not in the Hugging Face cache" in lines[0] and str(tmp_path / "empty-cache") in lines[0]
    assert "huggingface-cli download tiny-org/pixart-tiny" in lines[0]

    partial = tmp_path / "partial"  # a download that stopped before the text encoder and the tokenizer
    shutil.copytree(hub_cache["hub"], partial, symlinks=True)
    snapshot = partial / os.path.relpath(hub_cache["snapshot"], hub_cache["hub"])
    shutil.rmtree(snapshot / "tokenizer")
    os.remove(next(p for p in (snapshot / "text_encoder").iterdir() if p.name.endswith(".safetensors")))
    cut_short = dict(os.environ, HF_HUB_CACHE=str(partial))
    proc = subprocess.run([sys.executable, "sample.py", "--pretrained", "tiny-org/pixart-tiny", *prompt], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=cut_short)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "text_encoder/ (--text_encoder_root), tokenizer/ (--tokenizer_root)" in lines[0]
    assert "vae/" not in lines[0] and "transformer/" not in lines[0] and str(snapshot) in lines[0]
