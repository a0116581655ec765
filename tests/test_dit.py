"""DiT against diffusers' DiTTransformer2DModel and the official checkpoint layout, random weights."""
import os

import numpy as np
import pytest
import torch

from pixart.models.dit import ClassConditioning
from tests.helpers_hf import run_cell
from tests.isolation import in_fresh_process
from tests.test_lora import assert_close


def build_diffusers_dit(seed=0, hidden=64, heads=4, depth=2, sample_size=8, num_classes=10, norm_eps=1e-6):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=4,
                                  out_channels=8, num_layers=depth, sample_size=sample_size, patch_size=2,
                                  num_embeds_ada_norm=num_classes, norm_eps=norm_eps)
    with torch.no_grad():  # diffusers repeats the timestep and class embedders in every block: one set, as DiT
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        first = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first)
    return model.eval()


def run_theirs(model, x, t, labels):
    with torch.no_grad():
        return model(torch.from_numpy(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(labels),
                     return_dict=False)[0].numpy()


def run_ours(model, x, t, labels, compiled=False):
    return run_cell(model, x, t, ClassConditioning.of(labels), "graph" if compiled else "pynative")


def inputs(batch=3, size=8, num_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 4, size, size)).astype(np.float32)
    t = rng.integers(0, 1000, batch).astype(np.float32)
    labels = np.array([3, num_classes, 7][:batch], np.int64)  # the null class among them
    return x, t, labels


@pytest.mark.parametrize("compiled", [False, True])
def test_diffusers_folder_parity(tmp_path, compiled):
    from pixart.models.dit_checkpoint import load_dit
    from tools import convert

    theirs = build_diffusers_dit(norm_eps=1e-5)
    theirs.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    assert convert.main(["--source", str(tmp_path / "transformer"), "--target", str(tmp_path / "dit.ckpt")]) == 0
    ours, config = load_dit(str(tmp_path / "dit.ckpt"))
    assert config.num_classes == 10 and config.norm_eps == 1e-5 and config.num_heads == 4
    x, t, labels = inputs()
    assert_close(run_ours(ours, x, t, labels, compiled), run_theirs(theirs, x, t, labels))


def test_official_checkpoint_layout(tmp_path):
    """A bare state dict with the official keys (what DiT-XL-2-256x256.pt holds), pos_embed included."""
    from pixart.models.dit_checkpoint import diffusers_to_official, load_dit
    from pixart.models.pixart import sincos_pos_embed_2d
    from tools import convert

    theirs = build_diffusers_dit()
    for block in theirs.transformer_blocks:  # the official DiT divides by 128 where diffusers divides by 127
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    official = {k: torch.from_numpy(v.copy()) for k, v in diffusers_to_official(
        {k: v.numpy() for k, v in theirs.state_dict().items()}).items()}
    official["pos_embed"] = torch.from_numpy(sincos_pos_embed_2d(64, 4, 4, 1.0, 4)[None])
    torch.save(official, tmp_path / "DiT-tiny.pt")
    assert convert.main(["--source", str(tmp_path / "DiT-tiny.pt"), "--target", str(tmp_path / "dit.ckpt"),
                         "--num_heads", "4"]) == 0
    ours, config = load_dit(str(tmp_path / "dit.ckpt"))
    assert config.input_size == 8
    x, t, labels = inputs()
    assert_close(run_ours(ours, x, t, labels), run_theirs(theirs, x, t, labels))


def test_real_xl2_shapes():
    """DiT-XL/2 at 256px, 675M parameters, random weights: ours equals diffusers', eagerly (the
    compiled DiT equals the eager one in test_diffusers_folder_parity; compiling XL whole costs
    minutes and 16 GB here)."""
    in_fresh_process(check_real_xl2_shapes)


def check_real_xl2_shapes():
    from pixart.models.dit import DiT, DiTConfig
    from pixart.models.dit_checkpoint import diffusers_to_official
    from pixart.models.pixart_checkpoint import load_weights

    theirs = build_diffusers_dit(hidden=1152, heads=16, depth=28, sample_size=32, num_classes=1000)
    ours = DiT(DiTConfig(input_size=32, freq_shift=1), initialize=False)  # every weight is loaded next
    load_weights(ours, diffusers_to_official({k: v.numpy() for k, v in theirs.state_dict().items()}))
    # the official 675,129,632 counts the fixed 256 x 1152 sin-cos pos_embed, which we compute instead
    assert sum(int(np.prod(p.shape)) for p in ours.get_parameters()) == 675_129_632 - 256 * 1152
    x, t, labels = inputs(batch=2, size=32, num_classes=1000)
    assert_close(run_ours(ours, x, t, labels[:2]), run_theirs(theirs, x, t, labels[:2]))


@pytest.fixture(scope="module")
def dit_model(tmp_path_factory):
    """A tiny random DiT and SD-style VAE saved as diffusers folders, the DiT converted to our .ckpt."""
    from diffusers import AutoencoderKL
    from tools import convert

    folder = tmp_path_factory.mktemp("dit-tiny")
    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4, layers_per_block=1,
                        block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256, scaling_factor=0.18215).eval()
    vae.save_pretrained(folder / "vae")
    transformer = build_diffusers_dit(seed=2, num_classes=1000)  # DiTPipeline's null class is 1000, hard-coded
    transformer.save_pretrained(folder / "transformer")
    assert convert.main(["--source", str(folder / "transformer"), "--target", str(folder / "dit.ckpt")]) == 0
    (folder / "names.txt").write_text("\n".join(f"name {k}" for k in range(9)) + "\nname 1\n")  # class 9 repeats 1
    return dict(folder=folder, vae=vae, transformer=transformer, ckpt=folder / "dit.ckpt")


def run_dit_sample(m, tmp_path, latents, *extra):
    """sample.py in process on the tiny DiT; the PNGs, in order."""
    import sample
    from PIL import Image

    os.makedirs(tmp_path, exist_ok=True)
    np.save(tmp_path / "latents.npy", latents)
    out = tmp_path / "out"
    code = sample.main(["--checkpoint", str(m["ckpt"]), "--vae_root", str(m["folder"] / "vae"), "--latents",
                        str(tmp_path / "latents.npy"), "--image_height", "64", "--image_width", "64",
                        "--use_resolution_binning", "False", "--output_path", str(out), "--batch_size", "2", *extra])
    assert code == 0
    return [np.asarray(Image.open(out / f).convert("RGB")) for f in sorted(os.listdir(out)) if f.endswith(".png")]


def to_uint8(images):
    return [(im * 255).round().astype(np.uint8) for im in images]


def test_sample_matches_dit_pipeline_with_all_channel_guidance(dit_model, tmp_path):
    """DiTPipeline's own latents (randn_tensor from its generator) saved and given to sample.py."""
    from diffusers import DiTPipeline
    from diffusers.utils.torch_utils import randn_tensor

    from tests.test_sample import assert_images_close, dpm_scheduler

    m = dit_model
    latents = randn_tensor((2, 4, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    pipe = DiTPipeline(transformer=m["transformer"], vae=m["vae"], scheduler=dpm_scheduler())
    with torch.no_grad():
        theirs = pipe(class_labels=[3, 7], guidance_scale=4.0, num_inference_steps=8,
                      generator=torch.Generator().manual_seed(0), output_type="np").images
    ours = run_dit_sample(m, tmp_path, latents.numpy(), "--class_labels", "3", "7", "--sampling_method", "dpm",
                          "--sampling_steps", "8", "--guidance_scale", "4.0", "--cfg_channels", "all")
    assert_images_close(ours, to_uint8(theirs))


def official_three_channel_loop(m, latents, labels, steps, scale):
    """The official DiT sampling formula (``forward_with_cfg``) written out: guidance on eps channels
    0-2, channel 3 the conditional branch's, over diffusers' DPM-Solver++ and the diffusers DiT."""
    from tests.test_sample import dpm_scheduler

    scheduler = dpm_scheduler()
    scheduler.set_timesteps(steps)
    x = torch.from_numpy(latents)
    y = torch.tensor(labels + [1000] * len(labels))
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = m["transformer"](torch.cat([x, x]), timestep=t.expand(2 * len(labels)), class_labels=y).sample
            cond, uncond = out[:len(labels)], out[len(labels):]
            eps = torch.cat([uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3]), cond[:, 3:4]], dim=1)
            x = scheduler.step(eps, t, x).prev_sample
        image = m["vae"].decode(x / m["vae"].config.scaling_factor).sample
    return to_uint8((image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())


def test_sample_matches_the_official_three_channel_guidance(dit_model, tmp_path):
    from tests.test_sample import assert_images_close

    latents = np.random.default_rng(5).standard_normal((2, 4, 8, 8)).astype(np.float32)
    expected = official_three_channel_loop(dit_model, latents, [1, 8], 6, 4.0)
    ours = run_dit_sample(dit_model, tmp_path, latents, "--class_labels", "1", "8", "--sampling_method", "dpm",
                          "--sampling_steps", "6", "--guidance_scale", "4.0")  # the default for a DiT: 3 channels
    assert_images_close(ours, expected)
    all_channels = run_dit_sample(dit_model, tmp_path / "all", latents, "--class_labels", "1", "8",
                                  "--sampling_method", "dpm", "--sampling_steps", "6", "--guidance_scale", "4.0",
                                  "--cfg_channels", "all")
    assert max(np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(ours, all_channels)) > 0


def test_class_labels_by_name_and_clear_refusals(dit_model, tmp_path, capsys):
    import sample

    m = dit_model
    base = ["--checkpoint", str(m["ckpt"]), "--vae_root", str(m["folder"] / "vae"), "--image_height", "64",
            "--image_width", "64", "--sampling_steps", "2", "--output_path", str(tmp_path / "out"),
            "--class_names", str(m["folder"] / "names.txt"), "--seed", "4"]
    assert sample.main(base + ["--class_labels", "Name 4", "2"]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["00000-class-4-name-4.png", "00001-class-2-name-2.png"]
    for extra, message in [(["--class_labels", "name 1"], "names classes [1, 9]; give the id"),
                           (["--class_labels", "cat"], "is not a class name"),
                           (["--class_labels", "1000"], "is not a class of this model (0 to 999)"),
                           ([], "give --class_labels"),
                           (["--class_labels", "1", "--lora_path", str(m["folder"])], "not a DiT"),
                           (["--class_labels", "1", "--mode", "streamed"], "streamed mode runs PixArt blocks"),
                           (["--class_labels", "1", "--cfg_channels", "5"], "guided channels must be from 1")]:
        capsys.readouterr()
        assert sample.main(base + extra) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
