"""DiT against diffusers' DiTTransformer2DModel and the official checkpoint layout, random weights."""
import mindspore as ms
import numpy as np
import pytest
import torch

from pixart.models.dit import ClassConditioning
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
    cond = ClassConditioning.of(labels)
    if not compiled:
        return model(ms.Tensor(x), ms.Tensor(t), cond).asnumpy()

    @ms.jit
    def forward(x, t, *fields):
        return model(x, t, fields)
    return forward(ms.Tensor(x), ms.Tensor(t), *cond).asnumpy()


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
    """DiT-XL/2 at 256px, 675M parameters, random weights: ours equals diffusers'."""
    from pixart.models.dit import DiT, DiTConfig
    from pixart.models.dit_checkpoint import diffusers_to_official
    from pixart.models.pixart_checkpoint import load_weights

    theirs = build_diffusers_dit(hidden=1152, heads=16, depth=28, sample_size=32, num_classes=1000)
    ours = DiT(DiTConfig(input_size=32, freq_shift=1))
    load_weights(ours, diffusers_to_official({k: v.numpy() for k, v in theirs.state_dict().items()}))
    # the official 675,129,632 counts the fixed 256 x 1152 sin-cos pos_embed, which we compute instead
    assert sum(int(np.prod(p.shape)) for p in ours.get_parameters()) == 675_129_632 - 256 * 1152
    x, t, labels = inputs(batch=2, size=32, num_classes=1000)
    assert_close(run_ours(ours, x, t, labels[:2], compiled=True), run_theirs(theirs, x, t, labels[:2]))
