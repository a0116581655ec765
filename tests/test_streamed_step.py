"""The train step run block by block (``StreamedTrainStep``, train.py ``--mode streamed``): the
gradients and the training of the whole-model step, with the memory of one block. And the
update both run on CPU after the backward, in NumPy on the weights' memory: the compiled
update's numbers."""
import dataclasses

import numpy as np
import pytest
from mindspore import Parameter, Tensor

from pixart.errors import ConfigError
from pixart.models.dit import DiT, DiTConfig
from pixart.models.lora import attach_lora
from pixart.models.lora_spec import LoraSpec
from pixart.training.optim import make_optimizer
from pixart.training.streamed_step import StreamedTrainStep
from pixart.training.train_step import TrainStep
from tests.test_dynamic_shapes import TINY_MS, batch_of, tiny_ms_model
from tests.test_train import without_key_biases

# three blocks, the middle one with KV compression (a second template block), micro-conditions
STREAMED = dataclasses.replace(TINY_MS, depth=3, kv_compress_ratio=2, kv_compress_layers=(1,))


def test_streamed_gradients_equal_autodiff_of_the_whole_model():
    model = tiny_ms_model(STREAMED)
    params = model.trainable_params()
    whole = TrainStep(model, make_optimizer("adamw", params, lr=1e-3), compiled=False)
    streamed = StreamedTrainStep(model, make_optimizer("adamw", params, lr=1e-3))
    batch = batch_of(8, 8, 0)
    (_, loss, mse, vb), expected = whole.grad_fn(*whole._tensors(batch))
    got_loss, got_mse, got_vb, got = streamed._backward(batch)
    np.testing.assert_allclose([float(got_loss.asnumpy()), float(got_mse.asnumpy()), float(got_vb.asnumpy())],
                               [float(loss.asnumpy()), float(mse.asnumpy()), float(vb.asnumpy())], rtol=1e-6)
    assert len(got) == len(expected) == len(params)
    for param, value, reference in zip(params, got, expected):
        reference = reference.asnumpy()
        assert np.abs(reference).max() > 0, param.name  # every weight takes part
        np.testing.assert_allclose(value.asnumpy(), reference, rtol=1e-4, atol=1e-6 * np.abs(reference).max(),
                                   err_msg=param.name)


@pytest.mark.parametrize("optimizer,accumulation", [("adamw", 2), ("came", 1)])
def test_streamed_step_trains_as_the_whole_model_step(optimizer, accumulation):
    """Clipping, the optimizer, the EMA and gradient accumulation, over three updates."""
    results = []
    for step_class in (TrainStep, StreamedTrainStep):
        model = tiny_ms_model(STREAMED)
        step = step_class(model, make_optimizer(optimizer, model.trainable_params(), lr=1e-3), ema_decay=0.9,
                          grad_clip=0.5, grad_accumulation=accumulation)
        metrics = []
        for k in range(3):
            for micro in range(accumulation - 1):
                metrics.append(step.accumulate(batch_of(8, 8, 10 * k + micro)))
            metrics.append(step.update(batch_of(8, 8, 10 * k + 9), 1e-3))
        weights = {p.name: p.asnumpy() for p in model.get_parameters()}
        ema = step.ema_weights(weights)
        results.append(tuple(without_key_biases(values) for values in (weights, step.optimizer_state(), ema)))
        results[-1] = (metrics,) + results[-1]
    (metrics, weights, state, ema), (s_metrics, s_weights, s_state, s_ema) = results
    for expected, got in zip(metrics, s_metrics):  # up to 2.5e-6 apart on an AVX2-only CPU (other GEMM blocking)
        for key in ("loss", "mse", "vb", "grad_norm"):
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, err_msg=key)
    assert any(m["grad_norm"] > 0.5 for m in metrics)  # clipping took effect
    # CAME's factored second moments amplify the rounding differences of the gradients' sums
    # (up to 2.5e-6 on an AVX-512 CPU and 5.6e-6 on an AVX2-only one, about half a percent of
    # one step at lr 1e-3; a wrong update is off by a whole step). The key biases, whose
    # gradient is rounding noise, are left out (see tests.test_train.without_key_biases); with
    # CAME the whole bias vectors holding them, whose update is clipped by its RMS, noise included.
    # The optimizer state (normalised updates, squared gradients) is compared on its own scale
    # (CAME's: measured up to 1.1e-4 of a tensor's largest value).
    for reference, other, scaled in ((weights, s_weights, False), (state, s_state, True), (ema, s_ema, False)):
        assert sorted(reference) == sorted(other)
        for name, value in reference.items():
            if optimizer == "came" and name.endswith(("attn.qkv.bias", "kv_linear.bias")):
                continue
            atol = (3e-4 if optimizer == "came" else 1e-4) * np.abs(value).max() if scaled else \
                2e-5 if optimizer == "came" else 5e-6
            np.testing.assert_allclose(other[name], value, rtol=1e-5, atol=atol, err_msg=name)


def train_three_steps(optimizer, accumulation, compiled_update, monkeypatch):
    """Metrics, weights, optimizer state and EMA of a whole-model step, its update after the
    backward compiled or (the default on CPU) in NumPy."""
    model = tiny_ms_model(STREAMED)
    with monkeypatch.context() as patch:
        if compiled_update:
            patch.setattr(TrainStep, "_weights_on_host", lambda self: False)
        step = TrainStep(model, make_optimizer(optimizer, model.trainable_params(), lr=1e-3), ema_decay=0.9,
                         grad_clip=0.5, grad_accumulation=accumulation)
    assert step.host_update != compiled_update
    metrics = []
    for k in range(3):
        for micro in range(accumulation - 1):
            step.accumulate(batch_of(8, 8, 10 * k + micro))
        metrics.append(step.update(batch_of(8, 8, 10 * k + 9), 1e-3))
    weights = {p.name: p.asnumpy() for p in model.get_parameters()}
    return metrics, weights, step.optimizer_state(), step.ema_weights(weights)


@pytest.mark.parametrize("optimizer,accumulation", [("adamw", 2), ("came", 1)])
def test_the_host_update_equals_the_compiled_update(optimizer, accumulation, monkeypatch):
    """AdamW bit for bit; CAME to float32 rounding of its row and column sums, amplified over
    three steps by its normalised updates (measured 1.1e-4 of a state tensor's largest value)."""
    compiled = train_three_steps(optimizer, accumulation, True, monkeypatch)
    host = train_three_steps(optimizer, accumulation, False, monkeypatch)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in host[0]], [m[key] for m in compiled[0]],
                                   rtol=0 if optimizer == "adamw" else 1e-5, err_msg=key)
    for expected, got, scaled in zip(compiled[1:], host[1:], (False, True, False)):
        assert sorted(expected) == sorted(got)
        for name, value in expected.items():
            if optimizer == "adamw":
                np.testing.assert_array_equal(got[name], value, err_msg=name)
            elif not name.endswith(("attn.qkv.bias", "kv_linear.bias")):  # as in the test above
                atol = 3e-4 * np.abs(value).max() if scaled else 2e-5
                np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=atol, err_msg=name)


def test_streamed_step_refuses_what_it_does_not_stream(monkeypatch):
    def streamed(model, params=None, **kwargs):
        return StreamedTrainStep(model, make_optimizer("adamw", params or model.trainable_params(), lr=1e-3),
                                 **kwargs)

    with pytest.raises(ConfigError, match="PixArt model with the diffusion loss"):
        streamed(DiT(DiTConfig(input_size=8, hidden_size=48, depth=1, num_heads=4, num_classes=3)))
    model = tiny_ms_model()
    lora = attach_lora(model, LoraSpec(r=2))
    with pytest.raises(ConfigError, match="every weight"):
        streamed(model, [p for cell in lora.values() for p in cell.trainable_params()])
    with pytest.raises(ConfigError, match="dynamic"):
        streamed(tiny_ms_model(), dynamic_shapes=True)
    with pytest.raises(ConfigError, match="fp16"):
        streamed(tiny_ms_model(), loss_scale=1024.0)
    # where asnumpy() copies (a device's memory), the host update would be lost
    monkeypatch.setattr(Parameter, "asnumpy", lambda self: Tensor.asnumpy(self).copy())
    with pytest.raises(ConfigError, match="CPU only"):
        streamed(tiny_ms_model())
