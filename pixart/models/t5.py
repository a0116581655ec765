"""T5 encoder (T5 v1.1, as used by PixArt: t5-v1_1-xxl) as MindSpore cells.

Loads a Hugging Face ``T5EncoderModel`` folder as is: parameter names equal the checkpoint
keys (``shared.weight``, ``encoder.block.N.layer.0.SelfAttention.q.weight``, ...).

Architecture, per block: pre-norm self-attention, then a pre-norm feed-forward, both residual.
The norms are RMS norms (no mean, no bias); no linear has a bias; attention is not scaled
by 1/sqrt(d) (T5 folds it into the weights) and gets a learned relative position bias, which
the first block owns and every block reuses.

Precision. ``dtype`` sets the storage and matmul dtype of the big projections (q, k, v, o,
wi, wo). Everything else runs in fp32: the residual stream, the norms, the attention
softmax, the embeddings. T5 v1.1 is known to overflow fp16 in the feed-forward output, so
for fp16 ``wo`` and its input stay fp32 (transformers' ``_keep_in_fp32_modules = ["wo"]``)
and an fp16 matmul result that overflows is clamped to the largest finite fp16 value, the
guard transformers applies to T5 hidden states. With an fp32 residual stream that guard is
only needed at the matmul outputs. bf16 has fp32's range and needs neither.

Shapes: B batch, L tokens, D d_model, H heads, Dh d_kv, F d_ff.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from pixart.errors import ModelLoadError
from pixart.utils.hf_folder import load_folder_weights, read_folder_config

_FP16_MAX = 65504.0
_MASK_BIAS = float(np.finfo(np.float32).min)  # what transformers adds for padded keys


def _gelu_tanh(x):
    return ops.gelu(x, approximate="tanh")


def _gelu_exact(x):
    return ops.gelu(x, approximate="none")


_ACTIVATIONS = {"gelu_new": _gelu_tanh, "gelu": _gelu_exact, "relu": ops.relu, "silu": ops.silu}
_DTYPES = (ms.float32, ms.float16, ms.bfloat16)


@dataclasses.dataclass
class T5Config:
    """The fields of a Hugging Face T5 ``config.json`` that the encoder uses."""
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    def __post_init__(self):
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"feed_forward_proj must be 'ACT' or 'gated-ACT', got {self.feed_forward_proj!r}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r}: activation {self.activation!r} is not "
                             f"supported (supported: {', '.join(sorted(_ACTIVATIONS))})")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        # transformers maps "gated-gelu" to the tanh approximation, plain "gelu" to the exact one
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

    @classmethod
    def from_hf(cls, config: dict) -> "T5Config":
        """From a transformers ``config.json`` dict; keys the encoder does not use are ignored."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
        missing = [n for n in required if n not in config]
        if missing:
            raise ValueError(f"missing keys {', '.join(missing)}")
        return cls(**{n: config[n] for n in fields if n in config})


class T5Embedding(nn.Cell):
    """Lookup table ``weight`` (num, dim), kept in fp32: (...) int -> (..., dim) float32."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = Parameter(initializer("zeros", (num, dim), ms.float32), name="weight")

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


class T5Linear(nn.Cell):
    """Bias-free ``y = x W^T`` in ``dtype``: (..., in) -> (..., out) float32."""

    def __init__(self, in_features: int, out_features: int, dtype=ms.float32):
        super().__init__()
        self.compute_dtype = dtype
        self.weight = Parameter(initializer("zeros", (out_features, in_features), dtype), name="weight")

    def construct(self, x):
        y = ops.dense(x.astype(self.compute_dtype), self.weight)
        if self.compute_dtype == ms.float16:
            y = ops.clamp(y, -_FP16_MAX, _FP16_MAX)  # inf from an overflowing matmul -> finite
        return y.astype(ms.float32)


class T5RMSNorm(nn.Cell):
    """``x / rms(x) * weight`` over the last axis in fp32, no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(initializer("ones", (dim,), ms.float32), name="weight")

    def construct(self, x):
        x = x.astype(ms.float32)
        variance = (x * x).mean(-1, keep_dims=True)
        return x * ops.rsqrt(variance + self.eps) * self.weight


class T5Attention(nn.Cell):
    """Multi-head self-attention without score scaling; the bias (position + mask) is an input.

    The first block's instance also owns ``relative_attention_bias`` and computes the
    position bias every block uses (``position_bias``).
    """

    def __init__(self, config: T5Config, has_relative_attention_bias: bool, dtype):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.d_kv
        inner = config.num_heads * config.d_kv
        self.q = T5Linear(config.d_model, inner, dtype)
        self.k = T5Linear(config.d_model, inner, dtype)
        self.v = T5Linear(config.d_model, inner, dtype)
        self.o = T5Linear(inner, config.d_model, dtype)
        if has_relative_attention_bias:
            self.relative_attention_bias = T5Embedding(config.relative_attention_num_buckets, config.num_heads)
            self.half_buckets = config.relative_attention_num_buckets // 2
            self.max_distance = config.relative_attention_max_distance
            self.distance_to_bucket = Tensor(
                relative_distance_buckets(config.relative_attention_num_buckets, self.max_distance))

    def position_bias(self, length: int):
        """(1, H, L, L) bias for query i attending to key j, from the bucket of j - i."""
        pos = ops.arange(length, dtype=ms.int32)
        relative = pos[None, :] - pos[:, None]
        distance = ops.minimum(ops.abs(relative), self.max_distance)
        # bidirectional: keys after the query use the upper half of the buckets
        bucket = ops.gather(self.distance_to_bucket, distance, 0) + (relative > 0).astype(ms.int32) * self.half_buckets
        return self.relative_attention_bias(bucket).transpose(2, 0, 1)[None]

    def construct(self, x, bias):
        """x: (B, L, D) float32; bias: (B or 1, H, L, L) additive. Returns (B, L, D) float32."""
        b, n, _ = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k(x).reshape(b, n, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v(x).reshape(b, n, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        probs = ops.softmax(ops.matmul(q, k.swapaxes(-1, -2)) + bias, axis=-1)
        out = ops.matmul(probs, v).transpose(0, 2, 1, 3).reshape(b, n, -1)
        return self.o(out)


def relative_distance_buckets(num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of each distance |j - i| in [0, max_distance], for one direction (num_buckets / 2
    buckets): exact for distances below num_buckets / 4, log-spaced up to max_distance, then
    capped. Equals transformers' ``_relative_position_bucket``; the table is computed once in
    float64 because the float32 log of MindSpore and PyTorch round differently at the exact
    powers of two where a bucket starts (the epsilon restores those exact integers)."""
    half = num_buckets // 2
    max_exact = half // 2
    distance = np.arange(max_distance + 1)
    log_ratio = np.log(np.maximum(distance, 1) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + np.floor(log_ratio * (half - max_exact) + 1e-6).astype(np.int64)
    return np.where(distance < max_exact, distance, np.minimum(large, half - 1)).astype(np.int32)


class T5SelfAttentionLayer(nn.Cell):
    """Pre-norm self-attention sublayer; returns the residual update, (B, L, D)."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool, dtype):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias, dtype)
        self.layer_norm = T5RMSNorm(config.d_model, config.layer_norm_epsilon)

    def construct(self, x, bias):
        return self.SelfAttention(self.layer_norm(x), bias)


class T5FeedForward(nn.Cell):
    """``wo(act(wi_0 x) * wi_1 x)`` when gated, else ``wo(act(wi x))``: (B, L, D) -> (B, L, D)."""

    def __init__(self, config: T5Config, dtype):
        super().__init__()
        self.is_gated = config.is_gated
        self.act = _ACTIVATIONS[config.activation]
        if self.is_gated:
            self.wi_0 = T5Linear(config.d_model, config.d_ff, dtype)
            self.wi_1 = T5Linear(config.d_model, config.d_ff, dtype)
        else:
            self.wi = T5Linear(config.d_model, config.d_ff, dtype)
        self.wo = T5Linear(config.d_ff, config.d_model, ms.float32 if dtype == ms.float16 else dtype)

    def construct(self, x):
        if self.is_gated:
            h = self.act(self.wi_0(x)) * self.wi_1(x)
        else:
            h = self.act(self.wi(x))
        return self.wo(h)


class T5FeedForwardLayer(nn.Cell):
    """Pre-norm feed-forward sublayer; returns the residual update, (B, L, D)."""

    def __init__(self, config: T5Config, dtype):
        super().__init__()
        self.DenseReluDense = T5FeedForward(config, dtype)
        self.layer_norm = T5RMSNorm(config.d_model, config.layer_norm_epsilon)

    def construct(self, x):
        return self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Cell):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool, dtype):
        super().__init__()
        self.layer = nn.CellList([T5SelfAttentionLayer(config, has_relative_attention_bias, dtype),
                                  T5FeedForwardLayer(config, dtype)])

    def construct(self, x, bias):
        x = x + self.layer[0](x, bias)
        return x + self.layer[1](x)


class T5Stack(nn.Cell):
    """The blocks and the final norm: (B, L, D) embeddings -> (B, L, D) hidden states."""

    def __init__(self, config: T5Config, dtype):
        super().__init__()
        self.block = nn.CellList([T5Block(config, i == 0, dtype) for i in range(config.num_layers)])
        self.final_layer_norm = T5RMSNorm(config.d_model, config.layer_norm_epsilon)

    def construct(self, x, bias):
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


class T5Encoder(nn.Cell):
    """The Hugging Face ``T5EncoderModel``: token ids -> last hidden state.

    construct(input_ids, attention_mask=None)
        input_ids: (B, L) int; attention_mask: (B, L), 1 for tokens, 0 for padding.
        Returns (B, L, D) float32. Padded positions get values too (they attend to the real
        tokens); consumers mask them out.
    """

    def __init__(self, config: T5Config, dtype=ms.float32):
        super().__init__()
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(map(str, _DTYPES))}, got {dtype}")
        self.config = config
        self.compute_dtype = dtype
        self.shared = T5Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, dtype)

    def construct(self, input_ids, attention_mask=None):
        b, n = input_ids.shape
        x = self.shared(input_ids)
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(n)
        if attention_mask is not None:
            bias = bias + ((1.0 - attention_mask.astype(ms.float32)) * _MASK_BIAS).reshape(b, 1, 1, n)
        return self.encoder(x, bias)

    @classmethod
    def from_pretrained(cls, folder: str, dtype=ms.float32) -> "T5Encoder":
        """Build from ``folder/config.json`` and load ``model.safetensors`` or its shards.

        Accepts a ``T5EncoderModel`` folder and also a full T5 folder (the decoder and
        ``lm_head`` are skipped). Raises ``ModelLoadError`` when the folder is unusable.
        """
        raw = read_folder_config(folder, "T5 text encoder")
        try:
            config = T5Config.from_hf(raw)
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"T5 text encoder: {folder}/config.json: {e}") from None
        model = cls(config, dtype)
        load_folder_weights(model, folder, "model", rename=_checkpoint_name_to_param)
        model.set_train(False)
        return model


def _checkpoint_name_to_param(name: str):
    if name.startswith(("decoder.", "lm_head.")):
        return None
    # the encoder's embedding is tied to ``shared``; older exports store both copies
    return "shared.weight" if name == "encoder.embed_tokens.weight" else name
