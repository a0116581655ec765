"""PixArt-δ's ControlNet-Transformer against a PyTorch reference written from the official
``pixart_controlnet.py`` formulas on diffusers' blocks, random weights, real key layouts."""
import copy
import os

import mindspore as ms
import numpy as np
import pytest
import torch

from pixart.models.controlnet import ControlPixArt
from pixart.models.pixart import Conditioning
from tests import torch_pixart as ref
from tests.helpers_hf import run_cell
from tests.test_lora import assert_close


class TorchControlNet(torch.nn.Module):
    """The official ControlPixArtHalf forward, on a diffusers PixArtTransformer2DModel."""

    def __init__(self, base, num_blocks, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.base = base
        hidden = base.config.num_attention_heads * base.config.attention_head_dim
        self.copied = torch.nn.ModuleList(copy.deepcopy(base.transformer_blocks[i]) for i in range(num_blocks))
        self.before_proj = torch.nn.Linear(hidden, hidden)
        self.after_proj = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(num_blocks))
        with torch.no_grad():  # trained-looking weights: nothing at zero, the copies off their base
            for module in [self.before_proj, *self.after_proj]:
                module.weight.normal_(0, 0.05)
                module.bias.normal_(0, 0.05)
            for p in self.copied.parameters():
                p.add_(torch.randn_like(p) * 0.05)

    def forward(self, x, t, y, mask, control, resolution=None, aspect_ratio=None):
        base = self.base
        b = x.shape[0]
        h, w = x.shape[-2] // base.config.patch_size, x.shape[-1] // base.config.patch_size
        bias = ((1 - mask.float()) * -10000.0).unsqueeze(1)
        hidden = base.pos_embed(x)
        c = base.pos_embed(control)  # the base patch embedding and position embedding, at the same size
        added = {"resolution": resolution, "aspect_ratio": aspect_ratio}
        timestep, embedded = base.adaln_single(t, added, batch_size=b, hidden_dtype=hidden.dtype)
        y = base.caption_projection(y).view(b, -1, hidden.shape[-1])

        def run(block, tokens):
            return block(tokens, encoder_hidden_states=y, encoder_attention_mask=bias, timestep=timestep)

        blocks = base.transformer_blocks
        hidden = run(blocks[0], hidden)
        for i in range(len(self.copied)):
            c = run(self.copied[i], hidden + self.before_proj(c) if i == 0 else c)
            hidden = run(blocks[i + 1], hidden + self.after_proj[i](c))
        for block in blocks[len(self.copied) + 1:]:
            hidden = run(block, hidden)
        shift, scale = (base.scale_shift_table[None] + embedded[:, None]).chunk(2, dim=1)
        hidden = base.proj_out(base.norm_out(hidden) * (1 + scale) + shift)
        p, c_out = base.config.patch_size, base.out_channels
        hidden = hidden.reshape(-1, h, w, p, p, c_out)
        return torch.einsum("nhwpqc->nchpwq", hidden).reshape(-1, c_out, h * p, w * p)

    def official_state_dict(self, ours):
        """Our parameter names -> this reference's values (the official checkpoint's layout)."""
        from pixart.models.pixart_checkpoint import diffusers_to_official

        sd = {}
        for i, block in enumerate(self.copied):
            renamed = diffusers_to_official({f"transformer_blocks.{i}.{k}": v.detach().numpy()
                                             for k, v in block.state_dict().items()})
            sd.update({k.replace(f"blocks.{i}.", f"controlnet.{i}.copied_block.", 1): v for k, v in renamed.items()})
            sd[f"controlnet.{i}.after_proj.weight"] = self.after_proj[i].weight.detach().numpy()
            sd[f"controlnet.{i}.after_proj.bias"] = self.after_proj[i].bias.detach().numpy()
        sd["controlnet.0.before_proj.weight"] = self.before_proj.weight.detach().numpy()
        sd["controlnet.0.before_proj.bias"] = self.before_proj.bias.detach().numpy()
        return sd


def controlled_pair(tmp_path, num_blocks=2, micro=False, depth=3, hidden=64):
    from pixart.models.pixart_checkpoint import load_pixart, load_weights

    torch_base = ref.build_diffusers(depth=depth, micro=micro, hidden=hidden, sample_size=8)
    folder = tmp_path / "base"
    torch_base.save_pretrained(folder, safe_serialization=True)
    from tools import convert
    assert convert.main(["--source", str(folder), "--target", str(tmp_path / "base.ckpt"),
                         "--model_max_length", "6"]) == 0
    base, _ = load_pixart(str(tmp_path / "base.ckpt"))
    ours = ControlPixArt(base, num_blocks)
    theirs = TorchControlNet(torch_base, num_blocks).eval()
    load_weights(ours.controlnet, {k[len("controlnet."):]: v for k, v in theirs.official_state_dict(ours).items()})
    return ours, theirs


def run_ours(model, inputs, control, mode="pynative"):
    x, t, y, mask = inputs[:4]
    return run_cell(model, x, t, Conditioning.of(y, mask, *inputs[4:], control=control), mode)


@pytest.mark.parametrize("mode", ["pynative", "graph", "streamed"])
def test_control_forward_matches_the_official_formulas(tmp_path, mode):
    ours, theirs = controlled_pair(tmp_path)
    inputs = ref.make_inputs(batch=3, height=8, width=12, tokens=6)  # non-square, padded captions
    control = np.random.default_rng(7).standard_normal(inputs[0].shape).astype(np.float32)
    with torch.no_grad():
        expected = theirs(*(torch.from_numpy(a) for a in inputs), torch.from_numpy(control)).numpy()
        base = ref.run_diffusers(theirs.base, *inputs)
    assert np.abs(expected - base).max() > 1e-2  # the control branch matters
    assert_close(run_ours(ours, inputs, control, mode), expected)


def test_micro_conditioned_alpha_control(tmp_path):
    ours, theirs = controlled_pair(tmp_path, micro=True, hidden=48)
    x, t, y, mask = ref.make_inputs(batch=2, height=8, width=8, tokens=6)
    micro = (np.array([[64.0, 64.0], [64.0, 96.0]], np.float32), np.array([[1.0], [1.5]], np.float32))
    control = np.random.default_rng(8).standard_normal(x.shape).astype(np.float32)
    with torch.no_grad():
        expected = theirs(*(torch.from_numpy(a) for a in (x, t, y, mask, control, *micro))).numpy()
    assert_close(run_ours(ours, (x, t, y, mask, *micro), control), expected)


def test_zero_projections_give_the_base_output_exactly(tmp_path):
    from pixart.models.pixart_checkpoint import load_pixart

    ours, _ = controlled_pair(tmp_path)
    fresh = ControlPixArt(load_pixart(str(tmp_path / "base.ckpt"))[0], 2)
    fresh.copy_base_blocks()
    assert fresh.zero_projections()
    inputs = ref.make_inputs(batch=2, height=8, width=8, tokens=6)
    control = np.random.default_rng(9).standard_normal(inputs[0].shape).astype(np.float32)
    base = load_pixart(str(tmp_path / "base.ckpt"))[0]
    expected = base(ms.Tensor(inputs[0]), ms.Tensor(inputs[1]), Conditioning.of(*inputs[2:])).asnumpy()
    np.testing.assert_array_equal(run_ours(fresh, inputs, control), expected)
    copied = dict(fresh.controlnet[1].copied_block.parameters_and_names())
    for name, p in fresh.base_model.blocks[1].parameters_and_names():
        np.testing.assert_array_equal(copied[name].asnumpy(), p.asnumpy())
    assert [p.name for p in fresh.branch_parameters()][:2] == ["controlnet.0.copied_block.scale_shift_table",
                                                              "controlnet.0.copied_block.attn.qkv.weight"]


def test_official_and_diffusers_adapter_layouts_convert_and_load_exactly(tmp_path):
    """The official PixArt-XL-2-1024-ControlNet.pth layout (base_model.* + controlnet.*, under
    state_dict) and diffusers' research-project adapter layout (controlnet_blocks.N.*) both convert
    to a base .ckpt plus a control .ckpt that reproduce the reference; the branch exports back."""
    from pixart.models.controlnet import load_control_pixart, read_controlnet
    from pixart.models.pixart_checkpoint import load_pixart, official_to_diffusers
    from pixart.utils.safetensors_io import load_file, save_file
    from tools import convert

    _, theirs = controlled_pair(tmp_path)
    base_official = ref.official_state_dict(theirs.base, y_embedding_tokens=6, caption=32)
    control = theirs.official_state_dict(None)
    official = {f"base_model.{k}": v for k, v in base_official.items()}
    official.update({k: torch.from_numpy(v) for k, v in control.items()})
    torch.save({"state_dict": official}, tmp_path / "PixArt-XL-2-1024-ControlNet.pth")
    assert convert.main(["--source", str(tmp_path / "PixArt-XL-2-1024-ControlNet.pth"), "--target",
                         str(tmp_path / "control.ckpt"), "--input_size", "8", "--pe_interpolation", "1.0",
                         "--num_heads", "4"]) == 0
    model = load_control_pixart(load_pixart(str(tmp_path / "control-base.ckpt"))[0],
                                read_controlnet(str(tmp_path / "control.ckpt")))
    inputs = ref.make_inputs(batch=2, height=8, width=8, tokens=6)
    control_latents = np.random.default_rng(3).standard_normal(inputs[0].shape).astype(np.float32)
    with torch.no_grad():
        expected = theirs(*(torch.from_numpy(a) for a in inputs), torch.from_numpy(control_latents)).numpy()
    assert_close(run_ours(model, inputs, control_latents), expected)

    adapter = {}  # diffusers' PixArtControlNetAdapterModel names
    for i in range(2):
        block = {k.replace(f"controlnet.{i}.copied_block.", f"blocks.{i}.", 1): v for k, v in control.items()
                 if k.startswith(f"controlnet.{i}.copied_block.")}
        for k, v in official_to_diffusers(block).items():
            adapter[k.replace(f"transformer_blocks.{i}.", f"controlnet_blocks.{i}.transformer_block.", 1)] = v
        for proj in ("after_proj", "before_proj"):
            for kind in ("weight", "bias"):
                if f"controlnet.{i}.{proj}.{kind}" in control:
                    adapter[f"controlnet_blocks.{i}.{proj}.{kind}"] = control[f"controlnet.{i}.{proj}.{kind}"]
    save_file(adapter, str(tmp_path / "adapter.safetensors"))
    from_adapter = read_controlnet(str(tmp_path / "adapter.safetensors"))
    assert sorted(from_adapter) == sorted(control)
    assert all(np.array_equal(from_adapter[k], control[k]) for k in control)

    assert convert.main(["--source", str(tmp_path / "control.ckpt"), "--target",
                         str(tmp_path / "official.safetensors")]) == 0
    exported = load_file(str(tmp_path / "official.safetensors"))
    assert sorted(exported) == sorted(control) and all(np.array_equal(exported[k], control[k]) for k in control)


def test_a_controlnet_for_another_base_is_refused(tmp_path):
    from pixart.errors import ModelLoadError
    from pixart.models.controlnet import load_control_pixart
    from pixart.models.pixart_checkpoint import load_pixart

    _, theirs = controlled_pair(tmp_path)
    wider = ref.build_diffusers(hidden=96, sample_size=8, depth=3)
    wider.save_pretrained(tmp_path / "wider", safe_serialization=True)
    from tools import convert
    assert convert.main(["--source", str(tmp_path / "wider"), "--target", str(tmp_path / "wider.ckpt"),
                         "--model_max_length", "6"]) == 0
    with pytest.raises(ModelLoadError, match="shape mismatch"):
        load_control_pixart(load_pixart(str(tmp_path / "wider.ckpt"))[0], theirs.official_state_dict(None))


def test_control_branch_gradients_match_the_reference(tmp_path):
    """d(loss)/d(branch) ours (compiled value_and_grad) against torch autograd; the base gets none."""
    ours, theirs = controlled_pair(tmp_path)
    x, t, y, mask = ref.make_inputs(batch=2, height=8, width=8, tokens=6)
    control = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    weight = np.random.default_rng(6).standard_normal((2, 8, 8, 8)).astype(np.float32)
    params = ours.branch_parameters()
    for p in ours.base_model.get_parameters():
        p.requires_grad = False

    def loss_fn(x, t, *fields):
        return (ours(x, t, fields) * ms.Tensor(weight)).sum()

    grad_fn = ms.jit(ms.value_and_grad(loss_fn, None, params))
    _, grads = grad_fn(ms.Tensor(x), ms.Tensor(t), *Conditioning.of(y, mask, control=control))
    ours_grads = {p.name: g.asnumpy() for p, g in zip(params, grads)}
    theirs.zero_grad()
    out = theirs(*(torch.from_numpy(a) for a in (x, t, y, mask, control)))
    (out * torch.from_numpy(weight)).sum().backward()
    from pixart.models.pixart_checkpoint import diffusers_to_official
    expected = {}
    for i, block in enumerate(theirs.copied):
        grads_i = diffusers_to_official({f"transformer_blocks.{i}.{k}": v.grad.numpy()
                                         for k, v in block.named_parameters()})
        expected.update({k.replace(f"blocks.{i}.", f"controlnet.{i}.copied_block.", 1): v for k, v in grads_i.items()})
        expected[f"controlnet.{i}.after_proj.weight"] = theirs.after_proj[i].weight.grad.numpy()
    expected["controlnet.0.before_proj.weight"] = theirs.before_proj.weight.grad.numpy()
    for name, grad in expected.items():
        assert_close(ours_grads[name], grad)
    assert len(expected) > 20


@pytest.fixture(scope="module")
def sigma_with_controlnet(tmp_path_factory, shared_dir):
    """A tiny PixArt-Σ in the real formats, a new ControlNet branch for it (copies, zero
    projections) and one with trained-looking weights, both as control .ckpt files."""
    import os

    from pixart.models.controlnet import save_control_checkpoint
    from pixart.models.pixart_checkpoint import load_pixart
    from tests.test_sample import build_components
    from tools import convert

    folder = tmp_path_factory.mktemp("controlnet-e2e")
    build_components(folder, None)
    ckpt = folder / "transformer.ckpt"
    assert convert.main(["--source", str(folder / "transformer"), "--target", str(ckpt),
                         "--model_max_length", "300"]) == 0
    fresh = ControlPixArt(load_pixart(str(ckpt))[0], 1)
    fresh.copy_base_blocks()
    save_control_checkpoint({n: p.asnumpy() for n, p in fresh.parameters_and_names() if n.startswith("controlnet.")},
                            str(folder / "fresh-control.ckpt"))
    rng = np.random.default_rng(0)
    save_control_checkpoint({n: p.asnumpy() + rng.standard_normal(p.shape).astype(np.float32) * 0.2
                             for n, p in fresh.parameters_and_names() if n.startswith("controlnet.")},
                            str(folder / "trained-control.ckpt"))
    edges = np.zeros((64, 64, 3), np.uint8)
    edges[16:48, 30:34] = 255
    from PIL import Image
    Image.fromarray(edges).save(folder / "edges.png")
    return {"folder": folder, "ckpt": ckpt, "edges": folder / "edges.png",
            "models": ["--checkpoint", str(ckpt), "--vae_root", str(folder / "vae"), "--text_encoder_root",
                       str(folder / "text_encoder"), "--tokenizer_root", os.path.join(shared_dir, "t5_tokenizer")]}


def run_sample(c, out, *extra):
    import subprocess
    import sys

    from PIL import Image
    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, "sample.py", *c["models"], "--prompt", "a red apple", "--seed", "3",
                           "--image_height", "64", "--image_width", "64", "--sampling_steps", "3",
                           "--use_resolution_binning", "False", "--output_path", str(out), *map(str, extra)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = sorted(f for f in os.listdir(out) if f.endswith(".png"))[0]
    return np.asarray(Image.open(out / name).convert("RGB")), Image.open(out / name).text


def test_sample_py_with_a_controlnet(sigma_with_controlnet, tmp_path):
    """A new ControlNet (zero projections) changes nothing; a trained one changes the image; the
    PNG records the control; the flags check each other."""
    c = sigma_with_controlnet
    base, _ = run_sample(c, tmp_path / "base")
    fresh, _ = run_sample(c, tmp_path / "fresh", "--controlnet", c["folder"] / "fresh-control.ckpt",
                          "--control_image", c["edges"])
    np.testing.assert_array_equal(fresh, base)
    steered, meta = run_sample(c, tmp_path / "trained", "--controlnet", c["folder"] / "trained-control.ckpt",
                               "--control_image", c["edges"], "--control_strength", "0.8")
    assert np.abs(steered.astype(float) - base).mean() > 1.0
    assert meta["controlnet"] == "trained-control.ckpt" and meta["control_strength"] == "0.8"
    canny, _ = run_sample(c, tmp_path / "canny", "--controlnet", c["folder"] / "trained-control.ckpt",
                          "--control_image", c["edges"], "--control_preprocess", "canny")
    assert np.abs(canny.astype(float) - steered).mean() > 0.1  # Canny's edges of the bar are its outline
    import subprocess
    import sys
    from tests.conftest import ROOT
    proc = subprocess.run([sys.executable, "sample.py", *c["models"], "--prompt", "x", "--controlnet",
                           str(c["folder"] / "trained-control.ckpt")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "--controlnet and --control_image go together" in proc.stderr


def test_demo_generator_with_a_controlnet(sigma_with_controlnet, tmp_path):
    from PIL import Image

    from demo.generator import DemoGenerator, Request
    from pixart.errors import RequestError
    from pixart.models.autoencoder_kl import AutoencoderKL
    from pixart.models.controlnet import load_control_pixart, read_controlnet
    from pixart.models.pixart_checkpoint import load_pixart
    from pixart.models.t5 import T5Encoder
    from pixart.models.text_encoder import load_tokenizer
    from pixart.pipelines.text_to_image import PixArtPipeline

    c = sigma_with_controlnet
    model = load_control_pixart(load_pixart(str(c["ckpt"]))[0], read_controlnet(str(c["folder"] / "trained-control.ckpt")))
    pipeline = PixArtPipeline(model, AutoencoderKL.from_pretrained(str(c["folder"] / "vae")))
    gen = DemoGenerator(load_tokenizer(c["models"][-1]), T5Encoder.from_pretrained(str(c["folder"] / "text_encoder")),
                        300, pipeline, str(tmp_path), "transformer.ckpt")
    edges = np.asarray(Image.open(c["edges"]))
    result = gen.generate(Request("a red apple", seed=3, height=64, width=64, sampling_steps=2, control_image=edges))
    np.testing.assert_array_equal(result.control, edges)
    photo = result.images[0]
    canny = gen.generate(Request("a red apple", seed=3, height=64, width=64, sampling_steps=2, control_image=photo,
                                 control_preprocess="canny"))
    assert set(np.unique(canny.control)) <= {0, 255}
    with pytest.raises(RequestError, match="upload an edge map"):
        gen.check(Request("a cat", height=64, width=64))
