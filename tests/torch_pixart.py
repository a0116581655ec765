"""PyTorch references for the PixArt transformer tests.

diffusers' ``PixArtTransformer2DModel`` is the reference. It has no KV compression nor
qk-norm, so for those the self-attention of each block is replaced by a processor that
computes the official ``AttentionKVCompress`` formulas directly.
The official-key state dict is produced here with a mapping written independently of
the project's converter, so a wrong converter cannot agree with itself.
"""
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import PixArtTransformer2DModel


def build_diffusers(seed=0, hidden=64, heads=4, depth=2, caption=32, sample_size=8, interpolation_scale=1.0,
                    micro=False, patch=2, in_channels=4):
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=in_channels,
        out_channels=2 * in_channels, num_layers=depth, cross_attention_dim=hidden, sample_size=sample_size,
        patch_size=patch, caption_channels=caption, interpolation_scale=interpolation_scale,
        use_additional_conditions=micro, norm_elementwise_affine=False, norm_eps=1e-6,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000)
    with torch.no_grad():  # default init leaves tables/embedders tiny or zero: make every path matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


class OfficialSelfAttention(torch.nn.Module):
    """The official PixArt-Σ ``AttentionKVCompress`` on top of diffusers' q/k/v/out projections."""

    def __init__(self, dim, ratio=1, sampling="conv", qk_norm=False):
        super().__init__()
        self.ratio, self.sampling, self.hw = ratio, sampling, None
        if ratio > 1 and sampling == "conv":
            self.sr = torch.nn.Conv2d(dim, dim, groups=dim, kernel_size=ratio, stride=ratio)
            self.norm = torch.nn.LayerNorm(dim)
        self.q_norm = torch.nn.LayerNorm(dim) if qk_norm else torch.nn.Identity()
        self.k_norm = torch.nn.LayerNorm(dim) if qk_norm else torch.nn.Identity()
        with torch.no_grad():
            for p in self.parameters():
                p.add_(torch.randn_like(p) * 0.1)

    def downsample(self, t):
        b, n, c = t.shape
        h, w = self.hw
        r = self.ratio
        grid = t.reshape(b, h, w, c).permute(0, 3, 1, 2)
        if self.sampling == "conv":
            return self.norm(self.sr(grid).reshape(b, c, -1).permute(0, 2, 1))
        if self.sampling == "ave":
            grid = F.interpolate(grid, scale_factor=1 / r, mode="nearest")
        else:
            grid = grid[:, :, ::r, ::r]
        return grid.permute(0, 2, 3, 1).reshape(b, -1, c)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        b, n, c = hidden_states.shape
        q = self.q_norm(attn.to_q(hidden_states))
        k = self.k_norm(attn.to_k(hidden_states))
        v = attn.to_v(hidden_states)
        if self.ratio > 1:
            k, v = self.downsample(k), self.downsample(v)
        heads = attn.heads
        q, k, v = (t.reshape(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return attn.to_out[0](out)


def add_official_attention(model, layers, ratio=2, sampling="conv", qk_norm=False, seed=1):
    """Swap in ``OfficialSelfAttention`` on ``layers`` (qk-norm on every layer when asked).
    Returns {layer: module}; set ``module.hw`` to the token grid before each forward."""
    torch.manual_seed(seed)
    modules = {}
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    for i, block in enumerate(model.transformer_blocks):
        if i in layers or qk_norm:
            mod = OfficialSelfAttention(dim, ratio if i in layers else 1, sampling, qk_norm).eval()
            block.attn1.set_processor(mod)
            modules[i] = mod
    return modules


def official_state_dict(model, attention_modules=None, y_embedding_tokens=None, caption=None):
    """diffusers model -> official-key state dict of torch tensors (independent mapping)."""
    sd = model.state_dict()
    out = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"], "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "t_block.1.weight": sd["adaln_single.linear.weight"], "t_block.1.bias": sd["adaln_single.linear.bias"],
        "final_layer.linear.weight": sd["proj_out.weight"], "final_layer.linear.bias": sd["proj_out.bias"],
        "final_layer.scale_shift_table": sd["scale_shift_table"],
    }
    for ours, theirs in (("t_embedder", "timestep_embedder"), ("csize_embedder", "resolution_embedder"),
                         ("ar_embedder", "aspect_ratio_embedder")):
        for i, j in ((0, 1), (2, 2)):
            for kind in ("weight", "bias"):
                key = f"adaln_single.emb.{theirs}.linear_{j}.{kind}"
                if key in sd:
                    out[f"{ours}.mlp.{i}.{kind}"] = sd[key]
    for i, j in ((1, 1), (2, 2)):
        for kind in ("weight", "bias"):
            out[f"y_embedder.y_proj.fc{i}.{kind}"] = sd[f"caption_projection.linear_{j}.{kind}"]
    for n in range(model.config.num_layers):
        src, dst = f"transformer_blocks.{n}.", f"blocks.{n}."
        out[dst + "scale_shift_table"] = sd[src + "scale_shift_table"]
        for kind in ("weight", "bias"):
            out[dst + f"attn.qkv.{kind}"] = torch.cat([sd[src + f"attn1.to_{x}.{kind}"] for x in "qkv"])
            out[dst + f"attn.proj.{kind}"] = sd[src + f"attn1.to_out.0.{kind}"]
            out[dst + f"cross_attn.q_linear.{kind}"] = sd[src + f"attn2.to_q.{kind}"]
            out[dst + f"cross_attn.kv_linear.{kind}"] = torch.cat([sd[src + f"attn2.to_{x}.{kind}"] for x in "kv"])
            out[dst + f"cross_attn.proj.{kind}"] = sd[src + f"attn2.to_out.0.{kind}"]
            out[dst + f"mlp.fc1.{kind}"] = sd[src + f"ff.net.0.proj.{kind}"]
            out[dst + f"mlp.fc2.{kind}"] = sd[src + f"ff.net.2.{kind}"]
    for n, mod in (attention_modules or {}).items():
        for name, value in mod.state_dict().items():
            out[f"blocks.{n}.attn.{name}"] = value
    if y_embedding_tokens:
        g = torch.Generator().manual_seed(7)
        out["y_embedder.y_embedding"] = torch.randn(y_embedding_tokens, caption, generator=g) / caption ** 0.5
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def make_inputs(batch=2, channels=4, height=8, width=8, tokens=6, caption=32, seed=0, padded=True):
    """NumPy inputs: latents, timesteps, caption features, caption mask (second sample padded)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, channels, height, width)).astype(np.float32)
    t = rng.integers(0, 1000, size=batch).astype(np.float32)
    y = rng.standard_normal((batch, tokens, caption)).astype(np.float32)
    mask = np.ones((batch, tokens), np.int64)
    if padded:
        for i in range(1, batch):
            mask[i, max(1, tokens - 2 * i):] = 0
    return x, t, y, mask


def run_diffusers(model, x, t, y, mask, resolution=None, aspect_ratio=None):
    added = {"resolution": None, "aspect_ratio": None}
    if resolution is not None:
        added = {"resolution": torch.from_numpy(resolution), "aspect_ratio": torch.from_numpy(aspect_ratio)}
    with torch.no_grad():
        return model(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(y), timestep=torch.from_numpy(t),
                     added_cond_kwargs=added, encoder_attention_mask=torch.from_numpy(mask),
                     return_dict=False)[0].numpy()
