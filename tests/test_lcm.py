"""Latent consistency distillation (PixArt-δ) against a PyTorch reference written from the
formulas of the official ``train_pixart_lcm.py``, on a small diffusers model with random weights.
"""
import copy

import mindspore as ms
import numpy as np
import pytest
import torch

from pixart.diffusion.objectives import LCMObjective
from pixart.diffusion.schedule import training_schedule
from pixart.models.pixart import Conditioning
from tests import torch_pixart as ref
from tests.test_lora import assert_close, base_pair

GUIDANCE = 4.5


def torch_lcm_loss(student, teacher, target, x0, t, noise, y, mask, null, loss_type="huber", c=1e-3):
    """The official LCM distillation loss, written out with diffusers models (float32)."""
    schedule = training_schedule()
    abar = torch.from_numpy(schedule.alphas_cumprod)
    recip, recipm1 = (torch.from_numpy(v).float() for v in (schedule.sqrt_recip_alphas_cumprod,
                                                            schedule.sqrt_recipm1_alphas_cumprod))

    def col(table, steps):
        return table[steps].float().view(-1, 1, 1, 1)

    def scalings(steps):
        scaled = steps.float().view(-1, 1, 1, 1) / 0.1
        return 0.25 / (scaled ** 2 + 0.25), scaled / (scaled ** 2 + 0.25) ** 0.5

    def eps_of(model, x, steps, caption):
        out = model(x, encoder_hidden_states=caption, encoder_attention_mask=mask, timestep=steps,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        return out[:, :4]

    def x0_of(x, steps, eps):
        return col(recip, steps) * x - col(recipm1, steps) * eps

    x_t = col(abar.sqrt(), t) * x0 + col((1 - abar).sqrt(), t) * noise
    c_skip_t, c_out_t = scalings(t)
    prediction = c_skip_t * x_t + c_out_t * x0_of(x_t, t, eps_of(student, x_t, t, y))
    with torch.no_grad():
        eps_c, eps_u = eps_of(teacher, x_t, t, y), eps_of(teacher, x_t, t, null)
        x0_c, x0_u = x0_of(x_t, t, eps_c), x0_of(x_t, t, eps_u)
        x0_g, eps_g = x0_c + GUIDANCE * (x0_c - x0_u), eps_c + GUIDANCE * (eps_c - eps_u)
        s = torch.clamp(t - 20, min=0)
        x_s = col(abar.sqrt(), s) * x0_g + col((1 - abar).sqrt(), s) * eps_g
        c_skip_s, c_out_s = scalings(s)
        goal = c_skip_s * x_s + c_out_s * x0_of(x_s, s, eps_of(target, x_s, s, y))
    if loss_type == "l2":
        return ((prediction - goal) ** 2).mean()
    return (torch.sqrt((prediction - goal) ** 2 + c ** 2) - c).mean()


def frozen(model, role):
    for p in model.get_parameters():
        p.name = f"{role}.{p.name}"
        p.requires_grad = False
    model.set_train(False)
    return model


@pytest.mark.parametrize("loss_type", ["huber", "l2"])
def test_one_distillation_step_matches_the_formulas(tmp_path, loss_type):
    from pixart.models.pixart_checkpoint import load_pixart

    torch_student, student, ckpt = base_pair(tmp_path)
    teacher = frozen(load_pixart(str(ckpt))[0], "teacher")
    target = frozen(load_pixart(str(ckpt))[0], "target")
    rng = np.random.default_rng(0)
    with torch.no_grad():  # three different networks: a student already on its way, an EMA target
        torch_teacher = copy.deepcopy(torch_student)
        for p in torch_student.parameters():
            p.add_(torch.from_numpy(rng.standard_normal(tuple(p.shape)).astype(np.float32)) * 0.01)
        torch_target = copy.deepcopy(torch_student)
        for p in torch_target.parameters():
            p.add_(torch.from_numpy(rng.standard_normal(tuple(p.shape)).astype(np.float32)) * 0.01)
    from pixart.models.pixart_checkpoint import diffusers_to_official, load_weights
    for ours, theirs in ((student, torch_student), (target, torch_target)):
        sd = diffusers_to_official({k: v.numpy() for k, v in theirs.state_dict().items()})
        sd["y_embedder.y_embedding"] = dict(ours.parameters_and_names())["y_embedder.y_embedding"].asnumpy()
        load_weights(ours, sd)

    x0, _, y, mask = ref.make_inputs(batch=3, height=8, width=8, tokens=6)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = LCMObjective.draw_timesteps(np.random.default_rng(1), 3).astype(np.int32)
    t[0] = 19  # the last skipped step: the target is x_s itself (c_skip 1, c_out 0 at s = 0)
    objective = LCMObjective(student, teacher, target, GUIDANCE, loss_type)
    params = student.trainable_params()
    cond = Conditioning.of(y, mask)

    def loss_fn(x0, t, noise, *fields):
        return objective(x0, t, noise, fields)

    grad_fn = ms.jit(ms.value_and_grad(loss_fn, None, params, has_aux=True))
    (loss, l2), grads = grad_fn(ms.Tensor(x0), ms.Tensor(t), ms.Tensor(noise), *cond)

    null = dict(teacher.parameters_and_names())["y_embedder.y_embedding"].asnumpy()
    torch_loss = torch_lcm_loss(torch_student, torch_teacher, torch_target, torch.from_numpy(x0),
                                torch.from_numpy(t).long(), torch.from_numpy(noise), torch.from_numpy(y),
                                torch.from_numpy(mask), torch.from_numpy(np.repeat(null[None], 3, 0)), loss_type)
    torch_student.zero_grad()
    torch_loss.backward()
    reference = torch_loss.item()
    assert abs(float(loss.asnumpy()) - reference) <= 1e-4 * abs(reference) + 1e-7
    theirs = diffusers_to_official({k: v.grad.numpy() for k, v in torch_student.named_parameters()
                                    if v.grad is not None})
    ours = {p.name: g.asnumpy() for p, g in zip(params, grads)}
    compared = 0
    for name, grad in theirs.items():
        assert_close(ours[name], grad)
        compared += 1
    assert compared > 40 and float(l2.asnumpy()) > 0


def test_the_target_network_moves_by_ema_only(tmp_path):
    """Full distillation: the target is the student's EMA (decay 0.95), never trained; the teacher never moves."""
    from pixart.models.pixart_checkpoint import load_pixart
    from pixart.training.optim import make_optimizer
    from pixart.training.train_step import TrainStep

    _, student, ckpt = base_pair(tmp_path)
    teacher = frozen(load_pixart(str(ckpt))[0], "teacher")
    target = frozen(load_pixart(str(ckpt))[0], "target")
    params = student.trainable_params()
    by_name = {p.name[len("target."):]: p for p in target.get_parameters()}
    step = TrainStep(student, make_optimizer("adamw", params, lr=1e-3), LCMObjective(student, teacher, target),
                     ema_decay=0.95, ema_into=[by_name[p.name] for p in params], grad_clip=1.0)
    assert not {p.name for p in step.optimizer.params} & {p.name for p in target.get_parameters()}
    teacher_before = {n: p.asnumpy().copy() for n, p in teacher.parameters_and_names()}
    x0, _, y, mask = ref.make_inputs(batch=2, height=8, width=8, tokens=6)
    batch = dict(x0=x0, t=np.array([399, 19], np.int32), noise=np.random.default_rng(2).standard_normal(x0.shape)
                 .astype(np.float32), **{k: v.asnumpy() for k, v in Conditioning.of(y, mask)._asdict().items()})
    for _ in range(2):
        averaged = {p.name: by_name[p.name].asnumpy().copy() for p in params}
        out = step.update(batch, 1e-3)
        for p in params:
            np.testing.assert_allclose(by_name[p.name].asnumpy(), 0.95 * averaged[p.name] + 0.05 * p.asnumpy(),
                                       rtol=1e-5, atol=1e-7)
    assert np.isfinite(out["loss"]) and "l2" in out
    assert all(np.array_equal(p.asnumpy(), teacher_before[n]) for n, p in teacher.parameters_and_names())
