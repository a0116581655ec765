"""PixArt-δ's ControlNet-Transformer: a trainable copy of the first N blocks steering the base.

The control image (an edge map, 3 channels in [-1, 1], times a strength) is VAE-encoded and
embedded by the base's own patch embedding plus the same 2-D sin-cos position embedding: the
control tokens c. Then, with the base's block loop (``PixArt.run_blocks``)::

    x = base block 0 (x)
    control block 0:  c = copied_0(x + before_proj(c)),  skip_0 = after_proj_0(c)
    control block i:  c = copied_i(c),                   skip_i = after_proj_i(c)      i = 1 .. N-1
    x = base blocks 1 .. N (x + skip_{i-1} before block i), then the other base blocks unchanged

The skips are per-block residuals of the one block loop, so the graph and the streamed forward
run the controlled model as they run the base. ``before_proj`` and ``after_proj`` start at zero:
a new ControlNet leaves the base's output exactly unchanged. Parameter names are the official
``PixArt-XL-2-1024-ControlNet.pth`` keys: ``base_model.*`` and ``controlnet.{i}.copied_block.*``,
``controlnet.0.before_proj.*``, ``controlnet.{i}.after_proj.*``.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from pixart.models.pixart import Conditioning, Linear, PixArt, PixArtBlock
from pixart.utils.mindspore_ckpt import write_ckpt

# the number of base blocks PixArt-δ copies for XL/2 (of 28)
OFFICIAL_CONTROL_BLOCKS = 13


class ControlBlock(nn.Cell):
    """One block of the control branch: a copy of a base block, its zero-initialised output
    projection, and for the first block the zero-initialised input projection of the control tokens."""

    def __init__(self, base_block: PixArtBlock, index: int, hidden_size: int, compute_dtype=ms.float32):
        super().__init__()
        config, kv_ratio = base_block.config, base_block.attn.kv_ratio
        self.copied_block = PixArtBlock(config, kv_ratio, compute_dtype, base_block.kernels)
        self.index = index
        if index == 0:
            self.before_proj = Linear(hidden_size, hidden_size, compute_dtype=compute_dtype)
        self.after_proj = Linear(hidden_size, hidden_size, compute_dtype=compute_dtype)

    def construct(self, x, c, inputs, h: int, w: int):
        """x: the base's tokens after block 0 (read by block 0 only); c: the control tokens (B, N, D).
        Returns (c for the next control block, the residual for the next base block)."""
        if self.index == 0:
            c = self.copied_block(x + self.before_proj(c), inputs, h, w)
        else:
            c = self.copied_block(c, inputs, h, w)
        return c, self.after_proj(c)


class ControlPixArt(nn.Cell):
    """A PixArt transformer with a ControlNet branch on its first ``num_blocks`` blocks.

    construct(x, timestep, cond): as ``PixArt``, with ``cond.control`` the (B, C, H, W) latents of
    the control image (VAE-encoded, times the VAE's scaling factor), the shape of x.
    """
    conditioning = Conditioning

    def __init__(self, base_model: PixArt, num_blocks: int = OFFICIAL_CONTROL_BLOCKS):
        super().__init__()
        depth = base_model.config.depth
        if not 1 <= num_blocks < depth:
            raise ValueError(f"a ControlNet copies 1 to {depth - 1} of the {depth} blocks, got {num_blocks}")
        self.base_model = base_model
        hidden = base_model.config.hidden_size
        self.controlnet = nn.CellList([ControlBlock(base_model.blocks[i], i, hidden, base_model.dtype)
                                       for i in range(num_blocks)])
        self.num_blocks = num_blocks

    @property
    def config(self):
        return self.base_model.config

    def enable_recompute(self):
        """Activation checkpointing per block, base and control branch."""
        self.base_model.enable_recompute()
        for control in self.controlnet:
            control.copied_block.enable_recompute()

    def copy_base_blocks(self) -> None:
        """Initialise the control blocks from the base blocks they copy (a new ControlNet)."""
        for i, control in enumerate(self.controlnet):
            base = dict(self.base_model.blocks[i].parameters_and_names())
            for name, param in control.copied_block.parameters_and_names():
                param.set_data(Tensor(base[name].asnumpy().copy()))

    def control_tokens(self, control, h: int, w: int):
        base = self.base_model
        return base.x_embedder(control.astype(base.dtype)) + base.pos_embed(h, w).astype(base.dtype)[None]

    def control_residuals(self, x, c, inputs, h: int, w: int, run_control=None):
        """The per-block residuals for base blocks 1 .. N, from the tokens after base block 0."""
        residuals = []
        for i in range(self.num_blocks):
            if run_control is None:
                c, skip = self.controlnet[i](x, c, inputs, h, w)
            else:
                c, skip = run_control(i, x, c, inputs, h, w)
            residuals.append(skip)
        return residuals

    def construct(self, x, timestep, cond):
        base = self.base_model
        h, w = base.token_grid(x)
        tokens, t, inputs = base.embed(x, timestep, cond)
        tokens = base.run_blocks(tokens, inputs, h, w, stop=1)
        c = self.control_tokens(cond[5], h, w)
        residuals = self.control_residuals(tokens, c, inputs, h, w)
        tokens = base.run_blocks(tokens, inputs, h, w, residuals=residuals, start=1)
        return base.head(tokens, t, h, w)

    def zero_projections(self) -> bool:
        """Whether every before/after projection is still all zeros (the output is then the base's)."""
        projections = [c.after_proj for c in self.controlnet] + [self.controlnet[0].before_proj]
        return all(not np.any(p.weight.asnumpy()) and not np.any(p.bias.asnumpy()) for p in projections)

    def branch_parameters(self):
        """The trainable parameters of the control branch (the base stays frozen when training it)."""
        return list(self.controlnet.get_parameters())


# ------------------------------------------------------------------------------------- weights

CONTROL_PREFIX = "controlnet."


def split_control(sd):
    """(the base's weights, the control branch's ``controlnet.*`` weights) of a state dict with
    official names (``pixart_checkpoint.read_source`` gives them for every supported layout)."""
    control = {k: v for k, v in sd.items() if k.startswith(CONTROL_PREFIX)}
    return {k: v for k, v in sd.items() if not k.startswith(CONTROL_PREFIX)}, control


def control_block_count(control_sd) -> int:
    return len({k.split(".")[1] for k in control_sd if k.startswith(CONTROL_PREFIX)})


def read_controlnet(path: str):
    """The control branch's weights (``controlnet.*``) from a converted .ckpt, the official .pth /
    .safetensors (base included or not), or a diffusers ControlNet-adapter folder or file."""
    from pixart.errors import ModelLoadError
    from pixart.models.pixart_checkpoint import read_source

    _, control = split_control(read_source(path)[0])
    if not control:
        raise ModelLoadError(f"{path}: no ControlNet weights (expected controlnet.N.* or controlnet_blocks.N.* keys)")
    return control


def load_control_pixart(base_model: PixArt, control_sd, source: str = "ControlNet") -> ControlPixArt:
    """``base_model`` with the control branch ``control_sd`` (its block count read from the keys);
    ModelLoadError naming what does not fit the base."""
    from pixart.models.pixart_checkpoint import load_weights

    model = ControlPixArt(base_model, control_block_count(control_sd))
    load_weights(model.controlnet, {k[len(CONTROL_PREFIX):]: v for k, v in control_sd.items()}, source)
    model.set_train(False)
    return model


def save_control_checkpoint(control_sd, path: str, dtype: str = "fp32") -> None:
    """The control branch as a MindSpore .ckpt (official names), written atomically."""
    write_ckpt(path, control_sd, float_dtype=dtype)
