"""Activation checkpointing (train.py ``--recompute``): compiled gradients with the blocks'
activations recomputed equal those without, for PixArt (LoRA adapters included), a ControlNet
branch and DiT. MindSpore's recompute pass runs at compile time, and a wrong marking fails there
(a cycle in the gradient graph) rather than giving other numbers."""
import dataclasses

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from pixart.models.controlnet import ControlPixArt
from pixart.models.dit import DiT, DiTConfig
from pixart.models.lora import attach_lora
from pixart.models.lora_spec import LoraSpec
from pixart.models.pixart import Conditioning
from tests.test_dynamic_shapes import TINY_MS, batch_of, tiny_ms_model

TWO_BLOCKS = dataclasses.replace(TINY_MS, depth=2)


def randomised(model):
    rng = np.random.default_rng(0)
    for p in model.get_parameters():  # zero-initialised projections too, so every path counts
        p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.05))
    return model


def pixart():
    return tiny_ms_model(TWO_BLOCKS)


def pixart_with_lora():
    model = pixart()
    attach_lora(model, LoraSpec(r=2))
    return randomised(model)


def controlnet():
    return randomised(ControlPixArt(pixart(), 1))


def dit():
    return randomised(DiT(DiTConfig(input_size=8, hidden_size=48, depth=2, num_heads=4, num_classes=10)))


def gradients(build, recompute: bool):
    model = build()
    if recompute:
        model.enable_recompute()
    batch = batch_of(8, 8, 0)
    x, t = batch["x0"], batch["t"]
    if isinstance(model, DiT):
        cond = (np.arange(len(x), dtype=np.int32) % 10, np.zeros(len(x), bool))
    else:
        batch["control"] = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
        cond = tuple(batch[field] for field in Conditioning._fields)
    weight = Tensor(np.random.default_rng(2).standard_normal((len(x), 8, 8, 8)).astype(np.float32))
    params = model.trainable_params()

    def loss_fn(x, t, *fields):
        return (model(x, t, fields) * weight).sum()

    loss, grads = ms.jit(ms.value_and_grad(loss_fn, None, params))(Tensor(x), Tensor(t), *(Tensor(c) for c in cond))
    return float(loss.asnumpy()), {p.name: g.asnumpy() for p, g in zip(params, grads)}


@pytest.mark.parametrize("build", [pixart, pixart_with_lora, controlnet, dit])
def test_recomputed_gradients_equal_the_stored_ones(build):
    loss, expected = gradients(build, recompute=False)
    got_loss, got = gradients(build, recompute=True)
    assert got_loss == pytest.approx(loss, rel=1e-6)
    assert sorted(got) == sorted(expected)
    for name, reference in expected.items():
        np.testing.assert_allclose(got[name], reference, rtol=1e-5, atol=1e-6 * np.abs(reference).max(), err_msg=name)
