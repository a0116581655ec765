"""The extension points the features build on: the sampler registry, the block loop with
per-block residuals, adapter slots, explicit kernel choices, training a subset of the
parameters, and the script layer that turns library errors into messages.

Each test states what a new sampler, adapter or control branch may rely on.
"""
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, Tensor, nn, ops

from pixart.models.pixart import (
    BlockStreamedForward, Conditioning, Kernels, Linear, PixArtConfig, build_model, gelu_tanh_composed)
from tests.conftest import ROOT

TINY = PixArtConfig(input_size=8, depth=3, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=6)


def tiny_model(seed=0, **kwargs):
    model = build_model(TINY, **kwargs)
    rng = np.random.default_rng(seed)
    for p in model.get_parameters():  # every path non-trivial (zero-initialised projections included)
        p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.05))
    model.set_train(False)
    return model


def inputs(batch=2, seed=1):
    rng = np.random.default_rng(seed)
    x = Tensor(rng.standard_normal((batch, 4, 8, 8)).astype(np.float32))
    t = Tensor(np.array([10.0, 700.0][:batch], np.float32))
    mask = np.ones((batch, 6), np.int64)
    mask[1:, 4:] = 0
    return x, t, Conditioning.of(rng.standard_normal((batch, 6, 32)).astype(np.float32), mask)


# ------------------------------------------------------------------------------ sampler registry

def test_registry_lists_every_sampler_with_its_declaration():
    from pixart.diffusion.samplers import SAMPLERS, make_sampler

    assert list(SAMPLERS) == ["dpm", "ddim", "iddpm", "lcm"]
    for name, cls in SAMPLERS.items():
        assert cls.name == name and cls.description and cls.default_steps >= 1
        sampler = make_sampler(name, 5, noise=np.random.default_rng(0))
        assert sampler.model_channels(4) == (8 if cls.learned_variance else 4)
    assert SAMPLERS["iddpm"].stochastic and not SAMPLERS["dpm"].stochastic


def test_a_new_sampler_is_one_class(monkeypatch):
    """Registering a class is all it takes: make_sampler, sample.py's -h and choices, the pipeline."""
    from pixart.cli.inference import build_parser
    from pixart.diffusion import samplers

    monkeypatch.setattr(samplers, "SAMPLERS", dict(samplers.SAMPLERS))

    @samplers.register_sampler
    class HalfStep(samplers.Sampler):
        name = "half"
        description = "a toy: halves the sample each step"

        def __init__(self, sampling_steps, noise=None):
            self.timesteps = np.linspace(999, 0, sampling_steps).astype(np.int64)

        def step(self, model_output, index, sample):
            model_output, sample = self._inputs(model_output, index, sample)
            return sample * np.float32(0.5)

    sampler = samplers.make_sampler("half", 3)
    assert isinstance(sampler, HalfStep)
    parser = build_parser("")
    action = next(a for a in parser._actions if a.dest == "sampling_method")
    assert "half" in action.choices and "halves the sample" in action.help
    with pytest.raises(ValueError, match="unique name"):
        samplers.register_sampler(HalfStep)


def test_samplers_that_do_not_guide_skip_the_unconditional_batch(monkeypatch):
    from pixart.diffusion import samplers
    from pixart.pipelines.text_to_image import GuidedDenoiser, PixArtPipeline, TextEmbeddings

    calls = []
    monkeypatch.setattr(GuidedDenoiser, "__call__",
                        lambda self, latents, t, cond, guidance_scale=None: calls.append(guidance_scale)
                        or np.zeros((1, 8) + latents.shape[2:], np.float32))
    monkeypatch.setattr(samplers.DDIMSampler, "classifier_free_guidance", False)

    class FakeVAE:
        config = type("C", (), {"downsample_factor": 8, "sample_size": 64})
        scaling_factor, shift_factor = 1.0, 0.0

        def decode(self, z, tiled=False):
            return Tensor(np.zeros((1, 3, z.shape[2] * 8, z.shape[3] * 8), np.float32))

    pipe = PixArtPipeline(tiny_model(), FakeVAE(), mode="pynative")
    text = TextEmbeddings(np.zeros((1, 6, 32), np.float32), np.ones((1, 6), np.int64))
    pipe(text, text, 64, 64, sampling_method="ddim", sampling_steps=2, guidance_scale=4.5, seeds=[0],
         use_resolution_binning=False, progress=False)
    pipe(text, text, 64, 64, sampling_method="dpm", sampling_steps=2, guidance_scale=4.5, seeds=[0],
         use_resolution_binning=False, progress=False)
    assert calls == [None, None, 4.5, 4.5]


# ------------------------------------------------------------------------------ block loop

def test_block_loop_in_ranges_with_residuals_equals_the_forward():
    """A control branch runs block 0, then adds one residual per block to the next blocks' inputs."""
    model = tiny_model()
    x, t, cond = inputs()
    h, w = model.token_grid(x)
    tokens, temb, block_inputs = model.embed(x, t, cond)
    whole = model.head(model.run_blocks(tokens, block_inputs, h, w), temb, h, w).asnumpy()
    np.testing.assert_allclose(model(x, t, cond).asnumpy(), whole, rtol=0, atol=0)

    first = model.run_blocks(tokens, block_inputs, h, w, stop=1)
    rest = model.run_blocks(first, block_inputs, h, w, start=1)
    np.testing.assert_array_equal(model.head(rest, temb, h, w).asnumpy(), whole)

    zeros = [ops.zeros_like(first)] * 2
    np.testing.assert_array_equal(
        model.run_blocks(first, block_inputs, h, w, residuals=zeros, start=1).asnumpy(), rest.asnumpy())
    residual = Tensor(np.random.default_rng(2).standard_normal(first.shape).astype(np.float32))
    by_hand = model.blocks[2](model.blocks[1](first + residual, block_inputs, h, w), block_inputs, h, w)
    ours = model.run_blocks(first, block_inputs, h, w, residuals=[residual], start=1)
    np.testing.assert_allclose(ours.asnumpy(), by_hand.asnumpy(), rtol=1e-6, atol=1e-6)


def test_streamed_forward_runs_the_same_block_loop():
    model = tiny_model()
    x, t, cond = inputs()
    np.testing.assert_allclose(BlockStreamedForward(model)(x, t, cond).asnumpy(), model(x, t, cond).asnumpy(),
                               rtol=1e-5, atol=1e-6)


def test_block_loop_with_residuals_compiles():
    model = tiny_model()
    x, t, cond = inputs()
    residual = Tensor(np.full((2, 16, 64), 0.1, np.float32))

    @ms.jit
    def controlled(x, t, residual, *fields):
        h, w = model.token_grid(x)
        tokens, temb, block_inputs = model.embed(x, t, fields)
        tokens = model.run_blocks(tokens, block_inputs, h, w, stop=1)
        tokens = model.run_blocks(tokens, block_inputs, h, w, residuals=(residual, residual), start=1)
        return model.head(tokens, temb, h, w)

    def by_hand():
        h, w = model.token_grid(x)
        tokens, temb, block_inputs = model.embed(x, t, cond)
        tokens = model.blocks[0](tokens, block_inputs, h, w)
        for i in (1, 2):
            tokens = model.blocks[i](tokens + residual, block_inputs, h, w)
        return model.head(tokens, temb, h, w).asnumpy()

    np.testing.assert_allclose(controlled(x, t, residual, *cond).asnumpy(), by_hand(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ adapters

class LowRank(nn.Cell):
    """A minimal adapter: x -> x A^T B^T * scale, with a weight form."""

    def __init__(self, in_features, out_features, rank=2, seed=0, scale=0.5):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.down = Parameter(Tensor(rng.standard_normal((rank, in_features)).astype(np.float32) * 0.1), name="down")
        self.up = Parameter(Tensor(rng.standard_normal((out_features, rank)).astype(np.float32) * 0.1), name="up")
        self.scale = scale

    def construct(self, x):
        return ops.dense(ops.dense(x, self.down), self.up) * self.scale

    def delta_weight(self):
        return ops.matmul(self.up, self.down) * self.scale


def test_adapter_slots_cover_linears_and_the_patch_embedding():
    slots = tiny_model().adapter_slots()
    assert "x_embedder.proj" in slots and "blocks.0.attn.qkv" in slots and "final_layer.linear" in slots
    assert "blocks.2.cross_attn.kv_linear" in slots and "t_block.1" in slots
    assert all(hasattr(slot, "attach_adapter") for slot in slots.values())


@pytest.mark.parametrize("compiled", [False, True])
def test_an_attached_adapter_adds_to_the_output_and_merges_exactly(compiled):
    model = tiny_model()
    x, t, cond = inputs()

    def run():
        if not compiled:
            return model(x, t, cond).asnumpy()

        @ms.jit
        def forward(x, t, *fields):
            return model(x, t, fields)
        return forward(x, t, *cond).asnumpy()

    base = run()
    slots = model.adapter_slots()
    adapters = {"blocks.1.mlp.fc1": LowRank(64, 256), "x_embedder.proj": LowRank(16, 64, seed=1)}
    model.attach_adapters(adapters)
    adapted = run()
    assert np.abs(adapted - base).max() > 1e-3

    # merged into the weights, the adapter's effect is the same without it attached
    for name, adapter in adapters.items():
        slot = slots[name]
        delta = adapter.delta_weight().asnumpy().reshape(slot.weight.shape)
        slot.weight.set_data(Tensor(slot.weight.asnumpy() + delta))
        slot.detach_adapter()
    np.testing.assert_allclose(run(), adapted, rtol=1e-5, atol=1e-5)


def test_linear_with_adapter_is_base_plus_adapter():
    lin = Linear(5, 3)
    lin.weight.set_data(Tensor(np.arange(15, dtype=np.float32).reshape(3, 5) / 10))
    x = Tensor(np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32))
    base = lin(x).asnumpy()
    adapter = LowRank(5, 3)
    lin.attach_adapter(adapter, "lin")
    assert [p.name for p in adapter.get_parameters()] == ["lin.adapter.down", "lin.adapter.up"]
    np.testing.assert_allclose(lin(x).asnumpy(), base + adapter(x).asnumpy(), rtol=1e-6, atol=1e-6)
    assert lin.detach_adapter() is adapter and lin.adapter is None
    np.testing.assert_array_equal(lin(x).asnumpy(), base)


def test_load_weights_accepts_declared_adapter_keys_only():
    from pixart.errors import ModelLoadError
    from pixart.models.pixart_checkpoint import load_weights

    model = tiny_model()
    base = {name: p.asnumpy() for name, p in model.parameters_and_names()}
    model.attach_adapters({"blocks.0.attn.proj": LowRank(64, 64)})
    adapter_keys = [p.name for p in model.get_parameters() if ".adapter." in p.name]
    assert adapter_keys == ["blocks.0.attn.proj.adapter.down", "blocks.0.attn.proj.adapter.up"]
    load_weights(model, base, "base weights", optional=adapter_keys)  # the base alone: adapter keys may be absent
    with pytest.raises(ModelLoadError, match="missing: blocks.0.attn.proj.adapter.down"):
        load_weights(model, base, "base weights")
    bad = dict(base, **{"blocks.0.attn.proj.adapter.up": np.zeros((64, 3), np.float32)})
    with pytest.raises(ModelLoadError, match="shape mismatch: blocks.0.attn.proj.adapter.up"):
        load_weights(model, bad, "weights", optional=adapter_keys)
    with pytest.raises(ModelLoadError, match="unexpected: blocks.9.attn.proj.weight"):
        load_weights(model, dict(base, **{"blocks.9.attn.proj.weight": np.zeros(1)}), "weights", optional=adapter_keys)


# ------------------------------------------------------------------------------ kernel choices

def test_kernel_choice_follows_the_option_not_the_context(monkeypatch):
    from pixart.models import attention

    monkeypatch.setattr(attention, "flash_unavailable_reason", lambda device, dtype: "" if device == "Ascend" else "no")
    assert Kernels.for_device("CPU") == Kernels(attention="math", gelu="composed", heads="gather")
    assert Kernels.for_device("Ascend", ms.float16) == Kernels(attention="flash", gelu="fused", heads="transpose")
    assert Kernels.for_device("Ascend", ms.float16, attention="math").attention == "math"
    assert Kernels.for_device("GPU", ms.float16) == Kernels(attention="math", gelu="fused", heads="transpose")
    with pytest.raises(ValueError, match="attention kernel"):
        Kernels(attention="fast")
    with pytest.raises(ValueError, match="heads"):
        Kernels(heads="view")
    fused = build_model(TINY, kernels=Kernels(gelu="fused"))
    assert all(not cell.composed_gelu for _, cell in fused.cells_and_names() if hasattr(cell, "composed_gelu"))
    flash = build_model(TINY, kernels=Kernels(attention="flash"))
    assert flash.blocks[0].attn.attention_kernel == flash.blocks[0].cross_attn.attention_kernel == "flash"
    ms.set_device("CPU")
    assert tiny_model().blocks[0].attn.attention_kernel == "math"  # the default runs anywhere


def test_both_head_splits_give_the_same_model_output():
    x, t, cond = inputs()
    gathered = tiny_model(kernels=Kernels(heads="gather"))(x, t, cond).asnumpy()
    np.testing.assert_array_equal(gathered, tiny_model(kernels=Kernels(heads="transpose"))(x, t, cond).asnumpy())


def test_both_gelu_forms_give_the_same_model_output():
    x, t, cond = inputs()
    composed = tiny_model(kernels=Kernels(gelu="composed"))(x, t, cond).asnumpy()
    fused = tiny_model(kernels=Kernels(gelu="fused"))(x, t, cond).asnumpy()
    np.testing.assert_allclose(composed, fused, rtol=1e-4, atol=1e-5)
    z = Tensor(np.linspace(-6, 6, 101).astype(np.float32))
    np.testing.assert_allclose(gelu_tanh_composed(z).asnumpy(), ops.gelu(z, approximate="tanh").asnumpy(),
                               rtol=1e-5, atol=1e-6)


def test_vae_convolution_path_is_an_option():
    from pixart.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig, Conv2d

    config = AutoencoderKLConfig(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                 up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                                 sample_size=32)
    paths = {}
    for conv in ("im2col", "native", "auto"):
        vae = AutoencoderKL(config, conv=conv)
        paths[conv] = {cell.im2col for _, cell in vae.cells_and_names() if isinstance(cell, Conv2d)}
    assert paths == {"im2col": {True}, "native": {False}, "auto": {True}}  # auto on this CPU: im2col
    with pytest.raises(ValueError, match="conv must be"):
        AutoencoderKL(config, conv="winograd")


# ------------------------------------------------------------------------------ training a subset

def test_train_step_updates_only_the_chosen_parameters():
    from pixart.training.optim import make_optimizer
    from pixart.training.train_step import TrainStep

    model = tiny_model()
    chosen = [p for p in model.trainable_params() if p.name.startswith("blocks.1.")]
    frozen = {name: p.asnumpy().copy() for name, p in model.parameters_and_names() if not name.startswith("blocks.1.")}
    before = {p.name: p.asnumpy().copy() for p in chosen}
    step = TrainStep(model, make_optimizer("adamw", chosen, lr=1e-3), ema_decay=0.9, grad_clip=1.0)
    rng = np.random.default_rng(0)
    batch = dict(x0=rng.standard_normal((2, 4, 8, 8)).astype(np.float32), t=np.array([5, 900], np.int32),
                 noise=rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
                 **{k: v.asnumpy() for k, v in inputs()[2]._asdict().items()})
    out = step.update(batch, 1e-3)
    assert np.isfinite(out["loss"]) and out["grad_norm"] > 0
    for name, value in frozen.items():
        np.testing.assert_array_equal(dict(model.parameters_and_names())[name].asnumpy(), value, err_msg=name)
    assert all(np.abs(p.asnumpy() - before[p.name]).max() > 0 for p in chosen)
    assert {p.name for p in step.optimizer.params} == set(before)
    weights = {name: p.asnumpy() for name, p in model.parameters_and_names()}
    ema = step.ema_weights(weights)
    assert set(ema) == set(weights) and all(np.array_equal(ema[k], weights[k]) for k in frozen)


# ------------------------------------------------------------------------------ script layer

def test_library_errors_become_one_line_messages(tmp_path):
    missing = tmp_path / "nothing.pth"
    for script, args in (("tools/convert.py", ["--source", str(missing), "--target", str(tmp_path / "x.ckpt")]),
                         ("train.py", ["--json_path", "x.json", "--image_dir", str(tmp_path), "--feature_cache",
                                       str(tmp_path), "--checkpoint", str(missing)])):
        proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip().startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
        assert str(missing) in proc.stderr


def test_library_never_exits_the_process():
    """Only the scripts turn errors into exit codes: no sys.exit and no fail() in the package."""
    import pathlib

    offenders = []
    for path in (pathlib.Path(ROOT) / "pixart").rglob("*.py"):
        if path.parts[-2] == "cli":
            continue
        text = path.read_text()
        if "sys.exit" in text or "fail(" in text:
            offenders.append(str(path))
    assert not offenders


def test_scripts_import_no_scripts_and_edit_no_path():
    import pathlib

    scripts = [p for p in pathlib.Path(ROOT).glob("*.py")] + list((pathlib.Path(ROOT) / "tools").rglob("*.py")) \
        + list((pathlib.Path(ROOT) / "benchmarks").glob("*.py"))
    names = {p.stem for p in pathlib.Path(ROOT).glob("*.py")}
    for path in scripts:
        text = path.read_text()
        assert "sys.path.insert" not in text and "sys.path.append" not in text, path
        for name in names:
            assert f"\nimport {name}\n" not in text and f"\nfrom {name} import" not in text, (path, name)


def test_benchmarks_run_as_documented():
    """Every benchmark starts as the README shows it (python -m benchmarks.NAME) and explains its flags."""
    import pathlib

    for path in sorted((pathlib.Path(ROOT) / "benchmarks").glob("bench_*.py")):
        proc = subprocess.run([sys.executable, "-m", f"benchmarks.{path.stem}", "-h"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (path.stem, proc.stderr[-500:])
        assert f"python -m benchmarks.{path.stem}" in path.read_text(), path.stem
