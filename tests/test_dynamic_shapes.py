"""One compiled train step for every bucket shape (``TrainStep(dynamic_shapes=True)``,
train.py ``--dynamic_shapes``): the same numbers as one graph per shape, from fewer compilations.
"""
import dataclasses

import numpy as np
import pytest
from mindspore import Tensor
from mindspore.graph import api

from pixart.errors import ConfigError
from pixart.models.pixart import (Conditioning, PixArtConfig, build_model, sincos_pos_embed_2d,
                                  traced_pos_embed_2d, use_symbolic_grid)
from pixart.training.optim import make_optimizer
from pixart.training.train_step import TrainStep

TINY_MS = PixArtConfig(input_size=8, depth=1, hidden_size=48, num_heads=4, caption_channels=32, model_max_length=6,
                       multi_scale=True, micro_condition=True, pe_interpolation=0.5)
# latent (height, width) of three buckets, the first again. Batch 4 = heads 4 = the 8x8 bucket's
# token rows: the case where MindSpore 2.10 mixed up dimensions (see SelfAttention).
SHAPES = [(6, 10), (8, 8), (10, 6), (6, 10)]
BATCH = 4


def tiny_ms_model(config=TINY_MS):
    model = build_model(config)
    rng = np.random.default_rng(0)
    for p in model.get_parameters():  # every path non-trivial (zero-initialised projections included)
        p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.05))
    return model


def batch_of(h, w, seed, kept=(6, 4, 6, 6), tokens=6):
    """A batch of latents h x w whose captions of ``tokens`` tokens keep kept[i] leading ones."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(tokens)[None] < np.array(kept)[:, None]).astype(np.int64)
    cond = Conditioning.of(rng.standard_normal((BATCH, tokens, 32)).astype(np.float32), mask,
                           resolution=np.full((BATCH, 2), 8.0 * h), aspect_ratio=np.full((BATCH, 1), h / w))
    return dict(x0=rng.standard_normal((BATCH, 4, h, w)).astype(np.float32),
                t=rng.integers(0, 1000, BATCH).astype(np.int32), noise=rng.standard_normal((BATCH, 4, h, w)).astype(np.float32),
                **{k: v.asnumpy() for k, v in cond._asdict().items()})


def train_over_shapes(dynamic_shapes, config=TINY_MS, **captions):
    """Losses of accumulate + update over SHAPES, the trained weights, and the graphs compiled;
    ``captions``: batch_of's caption arguments."""
    model = tiny_ms_model(config)
    step = TrainStep(model, make_optimizer("adamw", model.trainable_params(), lr=1e-3), ema_decay=0.9,
                     grad_clip=1.0, grad_accumulation=2, dynamic_shapes=dynamic_shapes)
    compiled_before = len(api.ms_compile_cache)
    losses = []
    for k, (h, w) in enumerate(SHAPES):
        losses.append(step.accumulate(batch_of(h, w, 2 * k, **captions))["loss"])
        losses.append(step.update(batch_of(h, w, 2 * k + 1, **captions), 1e-3)["loss"])
    weights = {name: p.asnumpy() for name, p in model.parameters_and_names()}
    return np.array(losses), weights, len(api.ms_compile_cache) - compiled_before


def test_one_graph_for_every_bucket_shape_gives_the_same_training():
    static_losses, static_weights, static_compiled = train_over_shapes(False)
    losses, weights, compiled = train_over_shapes(True)
    # accumulate and gradients (with the gradient norms for the update in NumPy on CPU) for
    # each of the three shapes
    assert static_compiled == 6
    assert compiled == 2         # accumulate and gradients, once each
    np.testing.assert_allclose(losses, static_losses, rtol=1e-6, atol=1e-7)
    for name, value in static_weights.items():
        np.testing.assert_allclose(weights[name], value, rtol=1e-5, atol=1e-7, err_msg=name)


def test_captions_without_their_shared_padding_train_the_same():
    """A static-shape step gives its graphs the captions cut to ``unpadded_length`` (here 64 of
    300 tokens); a dynamic-shape one, whose graphs keep one caption length, all 300. The same
    losses and weights: a padded token's attention weight is exactly 0, in the backward too."""
    config = dataclasses.replace(TINY_MS, model_max_length=300)
    captions = dict(kept=(40, 3, 17, 1), tokens=300)
    model = tiny_ms_model(config)
    for dynamic_shapes, seen in ((False, 64), (True, 300)):
        step = TrainStep(model, make_optimizer("adamw", model.trainable_params(), lr=1e-3),
                         dynamic_shapes=dynamic_shapes)
        caption = step._tensors(batch_of(8, 8, 0, **captions))[step.input_order.index("caption")]
        assert caption.shape == (BATCH, seen, 32)
    static_losses, static_weights, _ = train_over_shapes(False, config, **captions)
    losses, weights, _ = train_over_shapes(True, config, **captions)
    np.testing.assert_allclose(losses, static_losses, rtol=1e-6, atol=1e-7)
    # a weight gradient of the caption's keys and values sums 64 rows or 300 (the rest zeros) in
    # another order, and AdamW's normalised step magnifies that rounding where a gradient is
    # small (measured up to 5.4e-7 after the four updates); one update moves a weight by ~1e-3
    for name, value in static_weights.items():
        np.testing.assert_allclose(weights[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("h,w", [(8, 8), (6, 10), (33, 17), (64, 64)])
def test_traced_position_embedding_equals_the_host_table(h, w):
    from pixart.runtime import jit

    def table(x):  # the grid from the input's shape, as in the model
        return traced_pos_embed_2d(48, x.shape[2], x.shape[3], 0.5, 4)

    traced = jit(table)(Tensor(np.zeros((1, 1, h, w), np.float32))).asnumpy()
    np.testing.assert_array_equal(traced, sincos_pos_embed_2d(48, h, w, 0.5, 4))


def test_symbolic_grid_refuses_what_needs_static_shapes():
    with pytest.raises(ConfigError, match="multi-scale"):
        use_symbolic_grid(build_model(PixArtConfig(input_size=8, depth=1, hidden_size=48, num_heads=4,
                                                   caption_channels=32, model_max_length=6, multi_scale=False)))
    compressed = PixArtConfig(input_size=8, depth=2, hidden_size=48, num_heads=4, caption_channels=32,
                              model_max_length=6, multi_scale=True, kv_compress_ratio=2, kv_compress_layers=(1,))
    with pytest.raises(ConfigError, match="KV compression"):
        use_symbolic_grid(build_model(compressed))
