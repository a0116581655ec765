"""DiT (Peebles & Xie, 2023): the class-conditional diffusion transformer PixArt grew out of.

Built from PixArt's own layers (patch embedding, sin-cos position embedding, self-attention,
MLP, LayerNorm, Linear, the timestep embedder), it differs where the models differ: the class
(with an extra "null" class for classifier-free guidance) conditions every block through
adaLN-Zero, its own ``Linear(D, 6D)`` per block, instead of PixArt's shared ``t_block`` plus a
per-block table; there is no cross-attention; the final layer is modulated the same way.
Parameter names are the official ``DiT-XL-2-256x256.pt`` keys::

    x_embedder.proj.*  t_embedder.mlp.{0,2}.*  y_embedder.embedding_table.weight
    blocks.N.attn.qkv.*  blocks.N.attn.proj.*  blocks.N.mlp.fc{1,2}.*  blocks.N.adaLN_modulation.1.*
    final_layer.linear.*  final_layer.adaLN_modulation.1.*     (pos_embed: a buffer, recomputed)

Shapes: B batch, C latent channels (4), H, W latent size, p patch, N = (H/p)(W/p) tokens, D hidden.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple, Optional

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from pixart.models.pixart import (Kernels, LayerNorm, Linear, Mlp, OfficialInit, PatchEmbed, SelfAttention,
                                  TimestepEmbedder, gated, linear_slots, modulate, sincos_pos_embed_2d)


@dataclasses.dataclass
class DiTConfig:
    """Architecture of a DiT; XL/2 at 256px by default."""
    checkpoint_key: ClassVar[str] = "dit_config"  # the entry of our .ckpt files holding it
    input_size: int = 32            # latent side (image side / 8)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    norm_eps: float = 1e-6          # the MLP's LayerNorm (diffusers' config may say otherwise)
    freq_shift: int = 0             # timestep frequencies exp(-log(1e4) k / (128 - shift)): 0 official, 1 diffusers

    def __post_init__(self):
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads must be a positive divisor of hidden_size {self.hidden_size}, "
                             f"got {self.num_heads}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {self.num_classes}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown DiT config keys: {', '.join(unknown)}")
        return cls(**d)


DIT_PRESETS = {
    "DiT-XL-2-256x256": DiTConfig(input_size=32),
    "DiT-XL-2-512x512": DiTConfig(input_size=64),
}


class ClassConditioning(NamedTuple):
    """What a DiT is conditioned on besides the timestep: labels (B,) int class ids (``num_classes``
    is the null class), drop_label (B,) bool, True where training replaces the label by the null
    class. Passed as PixArt's ``Conditioning`` is: one argument, a plain tuple in compiled code."""
    labels: Tensor
    drop_label: Tensor

    @classmethod
    def of(cls, labels, drop_label=None) -> "ClassConditioning":
        labels = np.asarray(labels, np.int32) if not isinstance(labels, Tensor) else labels
        drop = np.zeros((labels.shape[0],), bool) if drop_label is None else drop_label
        return cls(labels if isinstance(labels, Tensor) else Tensor(labels),
                   drop if isinstance(drop, Tensor) else Tensor(np.asarray(drop, np.bool_)))


class LabelEmbedder(nn.Cell):
    """Class ids -> (B, D): a table of num_classes + 1 rows, the last the null class."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Cell()
        self.embedding_table.weight = Parameter(Tensor(np.zeros((num_classes + 1, hidden_size), np.float32)),
                                                name="weight")

    def construct(self, labels, drop):
        labels = ops.where(drop, ops.full_like(labels, self.num_classes), labels)
        return ops.gather(self.embedding_table.weight, labels.astype(ms.int32), 0)


def ada_ln_modulation(hidden_size: int, chunks: int, compute_dtype=ms.float32) -> nn.SequentialCell:
    """SiLU then Linear: the conditioning vector (B, D) -> (B, chunks * D) shifts, scales and gates
    (the official ``nn.Sequential(nn.SiLU(), nn.Linear(...))``, its linear at index 1)."""
    return nn.SequentialCell([nn.SiLU(), Linear(hidden_size, chunks * hidden_size, compute_dtype=compute_dtype)])


class DiTBlock(nn.Cell):
    """adaLN-Zero block: x += gate_msa attn(modulate(LN(x))); x += gate_mlp mlp(modulate(LN(x)))."""

    def __init__(self, cfg: DiTConfig, compute_dtype=ms.float32, kernels: Kernels = Kernels()):
        super().__init__()
        dim = cfg.hidden_size
        self.norm1 = LayerNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, cfg.num_heads, compute_dtype=compute_dtype, kernels=kernels)
        self.norm2 = LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), dim, compute_dtype, kernels)
        self.adaLN_modulation = ada_ln_modulation(dim, 6, compute_dtype)

    def enable_recompute(self):
        """Recompute the attention and MLP activations in the backward pass (see
        ``PixArtBlock.enable_recompute``)."""
        for branch in (self.attn, self.mlp):
            branch.recompute()

    def construct(self, x, c, h: int, w: int):
        """x (B, N, D), c (B, D) -> (B, N, D)."""
        mod = self.adaLN_modulation(c).astype(x.dtype)[:, None]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ops.split(mod, x.shape[-1], axis=-1)
        x = x + gated(gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa), h, w))
        return x + gated(gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class DiTFinalLayer(nn.Cell):
    """LayerNorm, adaLN modulation (shift, scale) from the conditioning, projection to p*p*out."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, compute_dtype=ms.float32):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size)
        self.linear = Linear(hidden_size, patch_size * patch_size * out_channels, compute_dtype=compute_dtype)
        self.adaLN_modulation = ada_ln_modulation(hidden_size, 2, compute_dtype)

    def construct(self, x, c):
        shift, scale = ops.split(self.adaLN_modulation(c).astype(x.dtype)[:, None], x.shape[-1], axis=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Cell):
    """construct(x, timestep, cond) -> (B, out_channels, H, W) float32; x (B, C, H, W) latents
    of any size divisible by the patch (the position embedding is computed for it, as the
    official one is for its trained size), cond a ``ClassConditioning``."""
    conditioning = ClassConditioning

    def __init__(self, config: DiTConfig, dtype=ms.float32, kernels: Optional[Kernels] = None,
                 initialize: bool = True):
        """``initialize=False`` leaves the weights zero, for a loader that sets them all next."""
        super().__init__()
        self.config = cfg = config
        self.dtype = dtype
        self.kernels = kernels = kernels or Kernels()
        d = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, d, dtype)
        self.t_embedder = TimestepEmbedder(d, compute_dtype=dtype, freq_shift=cfg.freq_shift)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d)
        self.blocks = nn.CellList([DiTBlock(cfg, dtype, kernels) for _ in range(cfg.depth)])
        self.final_layer = DiTFinalLayer(d, cfg.patch_size, cfg.out_channels, dtype)
        if initialize:
            self.initialize_weights()

    def token_grid(self, x):
        _, _, hh, ww = x.shape
        p = self.config.patch_size
        if hh % p or ww % p:
            raise ValueError(f"latent size {hh}x{ww} is not divisible by the patch size {p}")
        return hh // p, ww // p

    def construct(self, x, timestep, cond):
        labels, drop_label = cond
        h, w = self.token_grid(x)
        grid = sincos_pos_embed_2d(self.config.hidden_size, h, w, 1.0, h)
        tokens = self.x_embedder(x.astype(self.dtype)) + Tensor(grid).astype(self.dtype)[None]
        c = self.t_embedder(timestep) + self.y_embedder(labels, drop_label)
        c = c.astype(self.dtype)
        for block in self.blocks:
            tokens = block(tokens, c, h, w)
        out = self.final_layer(tokens, c)
        p, channels = self.config.patch_size, self.config.out_channels
        out = out.reshape(out.shape[0], h, w, p, p, channels).transpose(0, 5, 1, 3, 2, 4)
        return out.reshape(out.shape[0], channels, h * p, w * p).astype(ms.float32)

    def enable_recompute(self):
        """Activation checkpointing per block."""
        for block in self.blocks:
            block.enable_recompute()

    def adapter_slots(self):
        return linear_slots(self)

    def initialize_weights(self, seed: int = 0):
        """The official initialisation: xavier-uniform linears (and the patch conv as a linear),
        N(0, 0.02) for the label table and timestep MLP, zero adaLN modulations and final projection."""
        init = OfficialInit(self, seed)
        rng, set_ = init.rng, init.set
        table = self.y_embedder.embedding_table.weight
        set_(table, rng.normal(0.0, 0.02, table.shape))
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            set_(lin.weight, rng.normal(0.0, 0.02, lin.weight.shape))
        zeroed = [b.adaLN_modulation[1] for b in self.blocks]
        zeroed += [self.final_layer.adaLN_modulation[1], self.final_layer.linear]
        for lin in zeroed:
            set_(lin.weight, np.zeros(lin.weight.shape))
            set_(lin.bias, np.zeros(lin.bias.shape))
