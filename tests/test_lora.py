"""LoRA against the PyTorch reference: diffusers' PixArtTransformer2DModel carrying the same adapter
through the real ``peft`` package, on random weights saved in the real formats.

peft gives random A and B (``init_lora_weights=False``) on the official PixArt target list, so
every adapted module matters, the patch-embedding conv included; alpha differs from the rank,
and rsLoRA, rank/alpha patterns and the single-file diffusers layout each have a case.
"""
import json
import os

import mindspore as ms
import numpy as np
import pytest
import torch

from pixart.models.lora import LoraMerger, attach_lora, load_into, read_lora, save_peft
from pixart.models.lora_spec import OFFICIAL_TARGETS, LoraSpec
from pixart.models.pixart import Conditioning
from tests import torch_pixart as ref
from tests.helpers_hf import run_cell
from tools import convert

TOL = 1e-4


def assert_close(ours, theirs, tol=TOL):
    scale = max(1.0, float(np.abs(theirs).max()))
    err = float(np.abs(ours - theirs).max())
    assert err <= tol * scale, f"max abs diff {err:.3g} > {tol} x {scale:.3g}"
    return err


def base_pair(tmp_path, micro=False, seed=0, hidden=64):
    """(diffusers model, our converted model) with the same random weights."""
    from pixart.models.pixart_checkpoint import load_pixart

    torch_model = ref.build_diffusers(seed=seed, micro=micro, sample_size=8, hidden=hidden)
    folder = tmp_path / f"transformer-{seed}-{micro}"
    torch_model.save_pretrained(folder, safe_serialization=True)
    target = tmp_path / f"base-{seed}-{micro}.ckpt"
    assert convert.main(["--source", str(folder), "--target", str(target), "--model_max_length", "6"]) == 0
    return torch_model, load_pixart(str(target))[0], target


def peft_adapter(torch_model, folder, seed=1, b_gain=40.0, **config):
    """A random PEFT adapter on ``torch_model`` (modified in place), saved to ``folder``; peft's
    random B is tiny, ``b_gain`` makes the adapters matter about as much as the base."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = {"r": 4, "lora_alpha": 6, "target_modules": list(OFFICIAL_TARGETS), "init_lora_weights": False,
              **config}
    peft_model = get_peft_model(torch_model, LoraConfig(**config))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(b_gain)
    peft_model.save_pretrained(folder)
    return peft_model.eval()


def run_theirs(model, inputs):
    x, t, y, mask = inputs[:4]
    resolution, aspect_ratio = inputs[4:] if len(inputs) > 4 else (None, None)
    return ref.run_diffusers(model, x, t, y, mask, resolution, aspect_ratio)


def run_ours(model, inputs, compiled=False):
    x, t, y, mask = inputs[:4]
    return run_cell(model, x, t, Conditioning.of(y, mask, *inputs[4:]), "graph" if compiled else "pynative")


@pytest.mark.parametrize("case", ["official", "rslora", "patterns"])
def test_peft_adapter_forward_parity_merged_and_unmerged(tmp_path, case):
    extra = {"official": {}, "rslora": {"use_rslora": True, "r": 8, "lora_alpha": 5},
             "patterns": {"rank_pattern": {"to_k": 2, "ff.net.2": 6}, "alpha_pattern": {"proj_out": 3.0}}}[case]
    torch_model, ours, _ = base_pair(tmp_path)
    inputs = ref.make_inputs(batch=2, height=8, width=12, tokens=6)
    base = run_ours(ours, inputs)
    peft_model = peft_adapter(torch_model, tmp_path / "adapter", **extra)
    expected = run_theirs(peft_model, inputs)
    assert np.abs(expected - base).max() > 1e-2  # the adapter changes the output

    lora = read_lora(str(tmp_path / "adapter"))
    assert any(m == "pos_embed.proj" for m in lora.factors)  # the conv is adapted too
    assert "transformer_blocks.0.attn1.to_q" in lora.factors and "adaln_single.linear" in lora.factors
    merger = LoraMerger(ours, [lora])
    merger.set_scales([1.0])
    merged = run_ours(ours, inputs)
    err = assert_close(merged, expected)
    print(f"{case}: merged max abs diff {err:.2e}")
    merger.set_scales([0.0])
    np.testing.assert_array_equal(run_ours(ours, inputs), base)  # scale 0 restores the base exactly

    spec = LoraSpec.from_peft_config(json.load(open(tmp_path / "adapter" / "adapter_config.json")), "test")
    cells = attach_lora(ours, spec)
    load_into(cells, lora)
    assert_close(run_ours(ours, inputs), expected)
    assert_close(run_ours(ours, inputs, compiled=True), expected)


def test_scales_change_exactly_and_adapters_add(tmp_path):
    torch_model, ours, _ = base_pair(tmp_path)
    peft_adapter(torch_model, tmp_path / "one", seed=1)
    inputs = ref.make_inputs(batch=2, height=8, width=8, tokens=6)
    weights = {n: p.asnumpy().copy() for n, p in ours.parameters_and_names()}
    merger = LoraMerger(ours, [read_lora(str(tmp_path / "one")), read_lora(str(tmp_path / "one"))])
    merger.set_scales([0.3, 0.5])
    twice = run_ours(ours, inputs)
    merger.set_scales([0.8, 0.0])
    assert_close(run_ours(ours, inputs), twice, tol=1e-5)  # 0.3 + 0.5 of one adapter = 0.8 of it
    for scales in ([1.7, -0.2], [0.25, 0.25], [0.0, 0.0]):
        merger.set_scales(scales)
    assert all(np.array_equal(p.asnumpy(), weights[n]) for n, p in ours.parameters_and_names())


def test_micro_conditioned_alpha_model(tmp_path):
    torch_model, ours, _ = base_pair(tmp_path, micro=True, hidden=96)
    peft_model = peft_adapter(torch_model, tmp_path / "adapter")
    x, t, y, mask = ref.make_inputs(batch=2, height=8, width=8, tokens=6)
    micro = (np.array([[64.0, 64.0], [64.0, 96.0]], np.float32), np.array([[1.0], [0.67]], np.float32))
    lora = read_lora(str(tmp_path / "adapter"))
    assert "adaln_single.emb.resolution_embedder.linear_1" in lora.factors
    LoraMerger(ours, [lora]).set_scales([1.0])
    assert_close(run_ours(ours, (x, t, y, mask, *micro)), run_theirs(peft_model, (x, t, y, mask, *micro)))


def test_single_file_diffusers_layout(tmp_path):
    """pytorch_lora_weights.safetensors: transformer./unet. prefixes, lora.down/lora.up names, no alpha."""
    from pixart.utils.safetensors_io import load_file, save_file

    torch_model, ours, _ = base_pair(tmp_path)
    peft_model = peft_adapter(torch_model, tmp_path / "adapter", r=4, lora_alpha=4)  # scale 1, as a file without alpha
    sd = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    renamed = {}
    for key, value in sd.items():
        key = key.replace("base_model.model.", "transformer." if "attn" in key else "unet.")
        if ".attn1.to_" in key:  # mindone's conversion renames only the attention factors
            key = key.replace("lora_A", "lora.down").replace("lora_B", "lora.up")
        renamed[key] = value
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(renamed, str(path))
    lora = read_lora(str(path))
    assert "stores no alpha" in lora.note
    LoraMerger(ours, [lora]).set_scales([1.0])
    inputs = ref.make_inputs(batch=2, height=8, width=8, tokens=6)
    assert_close(run_ours(ours, inputs), run_theirs(peft_model, inputs))


def test_our_adapter_loads_in_peft_with_the_same_outputs(tmp_path):
    """Round trip: an adapter made here -> PeftModel.from_pretrained on diffusers' model -> same output."""
    from peft import PeftModel

    torch_model, ours, _ = base_pair(tmp_path)
    spec = LoraSpec(r=3, lora_alpha=5, use_rslora=True)
    cells = attach_lora(ours, spec, seed=3)
    rng = np.random.default_rng(4)
    for p in ours.get_parameters():
        if "lora_B" in p.name:
            p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.3))
    save_peft(cells, spec, str(tmp_path / "ours"), tuple(ours.x_embedder.proj.weight.shape[1:]))
    peft_model = PeftModel.from_pretrained(torch_model, str(tmp_path / "ours")).eval()
    inputs = ref.make_inputs(batch=2, height=8, width=12, tokens=6)
    assert_close(run_ours(ours, inputs), run_theirs(peft_model, inputs))
    # no missing or unexpected keys on either side: every peft LoRA parameter came from the file
    from pixart.utils.safetensors_io import load_file
    saved = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    peft_keys = {k.replace(".default", "") for k, _ in peft_model.named_parameters() if "lora_" in k}
    assert peft_keys == set(saved)


@pytest.mark.parametrize("problem", ["other architecture", "truncated", "no config", "kohya names", "one factor"])
def test_bad_adapters_are_refused_naming_the_problem(tmp_path, problem):
    from pixart.errors import ModelLoadError
    from pixart.utils.safetensors_io import load_file, save_file

    torch_model, ours, _ = base_pair(tmp_path)
    folder = tmp_path / "adapter"
    weights = {n: p.asnumpy().copy() for n, p in ours.parameters_and_names()}
    if problem == "other architecture":
        wider = ref.build_diffusers(hidden=96, heads=4, sample_size=8)
        peft_adapter(wider, folder)
        message = "does not fit this transformer"
    else:
        peft_adapter(torch_model, folder)
        safetensors = folder / "adapter_model.safetensors"
        if problem == "truncated":
            data = safetensors.read_bytes()
            safetensors.write_bytes(data[:len(data) // 2])
            message = "truncated"
        elif problem == "no config":
            os.remove(folder / "adapter_config.json")
            message = "no adapter_config.json"
        elif problem == "kohya names":
            sd = load_file(str(safetensors))
            save_file({k.replace("base_model.model.", "lora_unet_").replace(".", "_"): v for k, v in sd.items()},
                      str(safetensors))
            message = "not LoRA factors"
        else:
            sd = load_file(str(safetensors))
            save_file({k: v for k, v in sd.items() if "to_q.lora_B" not in k}, str(safetensors))
            message = "has only one of its two factors"
    with pytest.raises(ModelLoadError, match=message):
        LoraMerger(ours, [read_lora(str(folder))])
    assert all(np.array_equal(p.asnumpy(), weights[n]) for n, p in ours.parameters_and_names())


def test_lora_gradients_match_peft(tmp_path):
    """d(loss)/d(A, B) of every adapter, ours (value_and_grad, compiled) against torch autograd through peft."""
    import mindspore as ms

    from pixart.models.lora import lora_parameters

    torch_model, ours, _ = base_pair(tmp_path)
    peft_model = peft_adapter(torch_model, tmp_path / "adapter", r=3, lora_alpha=5, b_gain=1.0)
    spec = LoraSpec.from_peft_config(json.load(open(tmp_path / "adapter" / "adapter_config.json")), "test")
    cells = attach_lora(ours, spec)
    load_into(cells, read_lora(str(tmp_path / "adapter")))
    x, t, y, mask = ref.make_inputs(batch=2, height=8, width=8, tokens=6)
    weight = np.random.default_rng(5).standard_normal((2, 8, 8, 8)).astype(np.float32)

    params = lora_parameters(cells)
    cond = Conditioning.of(y, mask)

    def loss_fn(x, t, *fields):
        return (ours(x, t, fields) * ms.Tensor(weight)).sum()

    grad_fn = ms.jit(ms.value_and_grad(loss_fn, None, params))
    _, grads = grad_fn(ms.Tensor(x), ms.Tensor(t), *cond)
    ours_grads = {p.name: g.asnumpy() for p, g in zip(params, grads)}

    peft_model.train()
    peft_model.zero_grad()
    out = peft_model(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(y), timestep=torch.from_numpy(t),
                     encoder_attention_mask=torch.from_numpy(mask),
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    (out * torch.from_numpy(weight)).sum().backward()
    theirs = {n.replace("base_model.model.", "").replace(".default", ""): p.grad.numpy()
              for n, p in peft_model.named_parameters() if "lora_" in n}

    from pixart.models.lora import _adapted_modules
    compared = 0
    for slot_name, module, part in _adapted_modules(cells):
        for factor, param in (("lora_A", part.lora_A), ("lora_B", part.lora_B)):
            expected = theirs[f"{module}.{factor}.weight"].reshape(ours_grads[param.name].shape)
            assert_close(ours_grads[param.name], expected)
            compared += 1
    assert compared == len(theirs) and compared > 40


# ---------------------------------------------------------------- end to end: sample.py, convert.py, demo

@pytest.fixture(scope="module")
def sigma_with_adapter(tmp_path_factory, shared_dir):
    """A tiny PixArt-Σ in the real formats plus a random PEFT adapter for its transformer."""
    from peft import PeftModel

    from tests.test_sample import build_components

    folder = tmp_path_factory.mktemp("lora-e2e")
    t5, vae, transformer = build_components(folder, None)
    ckpt = folder / "transformer.ckpt"
    assert convert.main(["--source", str(folder / "transformer"), "--target", str(ckpt),
                         "--model_max_length", "300"]) == 0
    peft_adapter(transformer, folder / "adapter", r=4, lora_alpha=8, b_gain=3.0)
    peft_model = PeftModel.from_pretrained(ref.build_diffusers(hidden=64, heads=4, depth=2, caption=32,
                                                               sample_size=8, interpolation_scale=8 / 64),
                                           str(folder / "adapter")).eval()
    return {"folder": folder, "ckpt": ckpt, "t5": t5, "vae": vae, "adapted": peft_model.base_model.model,
            "tokenizer": os.path.join(shared_dir, "t5_tokenizer")}


def test_sample_py_with_a_lora_matches_diffusers_with_peft(sigma_with_adapter, tmp_path):
    from diffusers import PixArtSigmaPipeline
    from PIL import Image
    from transformers import AutoTokenizer

    from tests.test_sample import PROMPTS, assert_images_close, dpm_scheduler

    c = sigma_with_adapter
    latents = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
    pipe = PixArtSigmaPipeline(tokenizer=AutoTokenizer.from_pretrained(c["tokenizer"]), text_encoder=c["t5"],
                               vae=c["vae"], transformer=c["adapted"], scheduler=dpm_scheduler())
    expected = pipe(PROMPTS, height=64, width=64, num_inference_steps=8, guidance_scale=4.5,
                    latents=torch.from_numpy(latents), output_type="pil", use_resolution_binning=False,
                    clean_caption=False, max_sequence_length=300).images
    np.save(tmp_path / "latents.npy", latents)
    out = tmp_path / "out"
    import subprocess
    import sys
    from tests.conftest import ROOT
    proc = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(c["ckpt"]), "--vae_root",
                           str(c["folder"] / "vae"), "--text_encoder_root", str(c["folder"] / "text_encoder"),
                           "--tokenizer_root", c["tokenizer"], "--lora_path", str(c["folder"] / "adapter"),
                           "--latents", str(tmp_path / "latents.npy"), "--image_height", "64", "--image_width", "64",
                           "--sampling_steps", "8", "--use_resolution_binning", "False", "--batch_size", "2",
                           "--output_path", str(out), "--prompt", *PROMPTS], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    ours = [np.asarray(Image.open(out / f).convert("RGB")) for f in files]
    assert_images_close(ours, [np.asarray(im) for im in expected])
    base = [np.asarray(im) for im in PixArtSigmaPipeline(
        tokenizer=AutoTokenizer.from_pretrained(c["tokenizer"]), text_encoder=c["t5"], vae=c["vae"],
        transformer=ref.build_diffusers(hidden=64, heads=4, depth=2, caption=32, sample_size=8,
                                        interpolation_scale=8 / 64), scheduler=dpm_scheduler())(
        PROMPTS, height=64, width=64, num_inference_steps=8, guidance_scale=4.5, latents=torch.from_numpy(latents),
        output_type="pil", use_resolution_binning=False, clean_caption=False, max_sequence_length=300).images]
    assert np.abs(ours[0].astype(float) - base[0]).mean() > 2.0  # the adapter visibly changes the image
    assert Image.open(out / files[0]).text["loras"] == "adapter@1"


def test_convert_bakes_a_lora_into_a_standalone_checkpoint(sigma_with_adapter, tmp_path):
    from pixart.models.pixart_checkpoint import load_pixart

    c = sigma_with_adapter
    baked = tmp_path / "baked.ckpt"
    assert convert.main(["--source", str(c["ckpt"]), "--lora_path", str(c["folder"] / "adapter"), "--lora_scale",
                         "0.7", "--target", str(baked)]) == 0
    merged, _ = load_pixart(str(baked))
    ours, _ = load_pixart(str(c["ckpt"]))
    LoraMerger(ours, [read_lora(str(c["folder"] / "adapter"))]).set_scales([0.7])
    inputs = ref.make_inputs(batch=2, height=8, width=8, tokens=300)
    np.testing.assert_allclose(run_ours(merged, inputs), run_ours(ours, inputs), rtol=1e-6, atol=1e-6)
    exported = tmp_path / "exported"
    assert convert.main(["--source", str(c["ckpt"]), "--lora_path", str(c["folder"] / "adapter"),
                         "--target", str(exported)]) == 0
    from diffusers import PixArtTransformer2DModel
    theirs = PixArtTransformer2DModel.from_pretrained(str(exported)).eval()
    assert_close(run_theirs(theirs, inputs), run_theirs(c["adapted"], inputs))


def test_demo_lora_strength_remerges_exactly(sigma_with_adapter, tmp_path):
    from demo.generator import DemoGenerator, MergedLoras, Request
    from pixart.errors import RequestError
    from pixart.models.autoencoder_kl import AutoencoderKL
    from pixart.models.pixart_checkpoint import load_pixart
    from pixart.models.t5 import T5Encoder
    from pixart.models.text_encoder import load_tokenizer
    from pixart.pipelines.loading import merge_loras
    from pixart.pipelines.text_to_image import PixArtPipeline

    c = sigma_with_adapter
    model, _ = load_pixart(str(c["ckpt"]))
    base = {n: p.asnumpy().copy() for n, p in model.parameters_and_names()}
    merger = merge_loras(model, [str(c["folder"] / "adapter")], [0.5])
    pipeline = PixArtPipeline(model, AutoencoderKL.from_pretrained(str(c["folder"] / "vae")))
    gen = DemoGenerator(load_tokenizer(c["tokenizer"]), T5Encoder.from_pretrained(str(c["folder"] / "text_encoder")),
                        300, pipeline, str(tmp_path), "transformer.ckpt",
                        loras=MergedLoras(merger, ["adapter"], [0.5]))
    request = dict(prompt="a red apple", seed=3, height=64, width=64, sampling_steps=3)
    half = gen.generate(Request(**request)).images[0]
    none = gen.generate(Request(**request, lora_strength=0.0)).images[0]
    assert all(np.array_equal(p.asnumpy(), base[n]) for n, p in model.parameters_and_names())
    again = gen.generate(Request(**request)).images[0]
    np.testing.assert_array_equal(half, again)
    assert np.abs(half.astype(float) - none).mean() > 1.0
    with pytest.raises(RequestError, match="LoRA strength"):
        gen.check(Request("a cat", height=64, width=64, lora_strength=5.0))
