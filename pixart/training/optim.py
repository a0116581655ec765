"""Optimizers and training utilities for PixArt, written to run inside one compiled train step.

* :class:`CAME` matches ``came_pytorch.CAME`` (PixArt-Σ's ``CAMEWrapper``) and :class:`AdamW`
  matches ``torch.optim.AdamW`` (PixArt-α).  Both are ``nn.Cell`` objects holding their state
  as Parameters; ``optimizer(grads, lr)`` applies one step in place, as one ``HyperMap`` over
  all parameters, and compiles inside an ``ms.jit`` train step.  ``step_on_host`` is the same
  step in NumPy, in place, for ``train.py --mode streamed`` (AdamW bit for bit).
* :func:`clip_grad_norm` matches ``torch.nn.utils.clip_grad_norm_``.
* :class:`EMA` is PixArt-α's ``ema_update``: ``ema = decay * ema + (1 - decay) * param``.
* :func:`constant_with_warmup` and :func:`auto_scale_lr` are PixArt's ``lr_schedule='constant'``
  (diffusers' ``get_constant_schedule_with_warmup``) and ``auto_lr``.
* fp16 loss scaling needs no code here: ``mindspore.amp.DynamicLossScaler`` and
  ``mindspore.amp.all_finite`` work in graph mode on CPU.  A train step that skips the update
  (weights, optimizer state, EMA) when a gradient overflows::

      optimizer = CAME(model.trainable_params(), lr=2e-5)
      ema = EMA(model.trainable_params(), decay=0.9999)
      scaler = amp.DynamicLossScaler(scale_value=2**16, scale_factor=2, scale_window=2000)

      def forward(*batch):
          loss = compute_loss(model, *batch)
          return scaler.scale(loss), loss
      grad_fn = ms.value_and_grad(forward, None, optimizer.params, has_aux=True)

      @ms.jit
      def train_step(lr, *batch):
          (_, loss), grads = grad_fn(*batch)
          grads = scaler.unscale(grads)
          finite = amp.all_finite(grads)
          grads, grad_norm = clip_grad_norm(grads, 0.01)
          if finite:
              loss = ops.depend(loss, optimizer(grads, lr))
              loss = ops.depend(loss, ema())
          loss = ops.depend(loss, scaler.adjust(finite))
          return loss, grad_norm, finite

      lr = Tensor(constant_with_warmup(updates_done, optimizer.base_lr, 1000), ms.float32)

Everything is float32 and uses only ``ops`` primitives with CPU kernels.  State Parameters are
named ``<prefix>.<kind>.<param name>`` (``came.exp_avg.blocks.0.attn.qkv.weight``,
``ema.blocks.0.attn.qkv.weight``) so one checkpoint can hold the model, the optimizer and the EMA:
``ms.save_checkpoint(optimizer.state_parameters(), path)`` and
``optimizer.load_state(ms.load_checkpoint(path))``.
"""
from __future__ import annotations

import math
import threading
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

__all__ = [
    "AdamW", "CAME", "EMA", "Scratch", "auto_scale_lr", "clip_grad_norm", "constant_with_warmup", "make_optimizer",
]

_hyper_map = ops.HyperMap()
# Division as the RealDiv primitive, not ``/`` (MindSpore 2.10's Div): in a compiled graph the CPU
# Div kernel keeps a buffer four times its output's size for the life of the graph, which made
# AdamW's update hold about 11 weight-sized buffers per weight (RealDiv divides bit for bit alike).
divide = ops.RealDiv()


# ------------------------------------------------------------------------------- shared plumbing

def _check_params(params: Iterable[Parameter], owner: str) -> List[Parameter]:
    params = list(params)
    if not params:
        raise ValueError(f"{owner} got an empty parameter list")
    names = set()
    for p in params:
        if not isinstance(p, Parameter):
            raise TypeError(f"{owner} expects mindspore Parameters, got {type(p).__name__}")
        if p.dtype != ms.float32:
            raise TypeError(f"{owner} keeps float32 master weights; parameter {p.name!r} is {p.dtype}")
        if p.name in names:
            raise ValueError(f"{owner}: two parameters are named {p.name!r}")
        names.add(p.name)
    return params


def _state(name: str, value: np.ndarray) -> Parameter:
    return Parameter(Tensor(value), name=name, requires_grad=False)


def _graph_scalars(values: Iterable[float], dtype=ms.float32) -> Tuple[Tensor, ...]:
    """Hyper-parameters as 0-d Tensors, the form in which they enter a compiled step.

    Not as Python floats: graph mode makes each a scalar constant (``FP32Imm``) that becomes part
    of the keys of the compiler's analysis caches, and MindSpore (2.x, ``ir/scalar.cc``) compares
    two ``FP32Imm`` with an absolute tolerance, ``fabs(a - b) < DBL_EPSILON`` (2.2e-16), while it
    hashes them exactly.  So CAME's eps (1e-30, 1e-16) and a 0.0 all count as equal, with
    different hashes: whether a lookup for ``x + 1e-16`` lands on the entry of ``x + 1e-30``
    depends on the hash-table layout of the run.  When it does, the compile fails ("Fail to get
    eval result with conf ... add ... 1e-16") or, silently, ``x + 1e-16`` is compiled as
    ``x + 1e-30`` (about 8% of compiles of ``lambda x: (x + 1e-30, x + 1e-16)``).  A 0-d Tensor
    holds the same rounded value and is never compared that way.
    """
    return tuple(Tensor(float(v), dtype) for v in values)


def _assigned(targets: Sequence[Parameter], values: Sequence[Tensor]) -> Tuple[Tensor, ...]:
    return tuple(ops.assign(target, value) for target, value in zip(targets, values))


class Scratch:
    """Reusable float32 work arrays for the host steps (``step_on_host``): a new array the size
    of a weight costs about a pass over it, as the system zeroes its pages. ``scratch(shape,
    slot)`` is a view of one buffer per slot and thread, grown to the largest shape asked for, so
    that a slot's array is valid until the same thread asks for that slot again; each thread has
    its own, so that threads may update different parameters at once."""

    def __init__(self):
        self._buffers: Dict[Tuple[int, int], np.ndarray] = {}

    def __call__(self, shape, slot: int = 0) -> np.ndarray:
        key, size = (slot, threading.get_ident()), math.prod(shape)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.size < size:
            buffer = self._buffers[key] = np.empty(size, np.float32)
        return buffer[:size].reshape(shape)


def _load_named(targets: Sequence[Parameter], param_dict: Dict[str, Tensor], owner: str) -> None:
    """Copy ``param_dict[p.name]`` into each target after checking that every one is present
    and shaped alike: a partial restore would silently mix two training runs."""
    missing = [p.name for p in targets if p.name not in param_dict]
    if missing:
        raise KeyError(f"{owner}: {len(missing)} state entries missing from the checkpoint, e.g. {missing[:3]}")
    for p in targets:
        value = param_dict[p.name]
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"{owner}: {p.name!r} has shape {tuple(value.shape)} in the checkpoint, "
                             f"expected {tuple(p.shape)}")
        p.set_data(Tensor(value.asnumpy(), dtype=p.dtype))


class _Optimizer(nn.Cell):
    """The trained parameters, a step counter, and a subclass's zero-initialised moments.

    ``construct(grads, lr)``: ``grads`` is a tuple of float32 Tensors in the order of
    ``self.params`` (what ``ms.value_and_grad(fn, None, optimizer.params)`` returns); ``lr`` is
    a float32 scalar Tensor, an input so that a schedule does not recompile.  Returns the step
    count after the update (int32 scalar) for ``ops.depend``.
    """

    prefix = ""

    def __init__(self, params: Iterable[Parameter], lr: float, weight_decay: float):
        super().__init__()
        params = _check_params(params, type(self).__name__)
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.base_lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.params = ParameterTuple(params)
        self.step = _state(f"{self.prefix}.step", np.array(0, np.int32))
        self._moment_fields: Tuple[str, ...] = ()

    def _add_moments(self, field: str, kind: str, params: Sequence[Parameter], shape_of=lambda shape: shape):
        """``self.<field>``: one zero float32 Parameter ``<prefix>.<kind>.<param name>`` per param."""
        setattr(self, field, ParameterTuple(
            _state(f"{self.prefix}.{kind}.{p.name}", np.zeros(shape_of(tuple(p.shape)), np.float32)) for p in params))
        self._moment_fields += (field,)

    def state_parameters(self) -> List[Parameter]:
        """The step counter and every moment, e.g. for ``ms.save_checkpoint``."""
        return [self.step] + [p for field in self._moment_fields for p in getattr(self, field)]

    def load_state(self, param_dict: Dict[str, Tensor]) -> None:
        """Restore :meth:`state_parameters` from ``ms.load_checkpoint``'s dict (other keys, e.g.
        the model's weights, are ignored)."""
        _load_named(self.state_parameters(), param_dict, type(self).__name__)

    def construct(self, grads, lr):
        step = self.count_step()
        return ops.depend(step, self.update_params(grads, lr, step))

    def count_step(self) -> Tensor:
        """Advance the step counter; returns the new count."""
        return ops.assign_add(self.step, ops.ones((), ms.int32))

    def update_params(self, grads, lr, step):
        """Update every parameter by its gradient at step count ``step`` (``construct``
        after counting the step; ``StreamedTrainStep`` counts once for several optimizers)."""
        raise NotImplementedError

    def step_on_host(self, params: Sequence[np.ndarray], grads: Sequence[np.ndarray],
                     moments: Sequence[Sequence[np.ndarray]], lr: float, step: int, scratch: Scratch) -> None:
        """``update_params`` in NumPy, in place: ``params`` some of this optimizer's parameters as
        arrays over their memory, their gradients (overwritten), their ``moments_of`` lists as
        arrays, the step count after counting this step. For ``StreamedTrainStep``, a group of
        parameters at a time: MindSpore 2.10's CPU kernels take 2-4x NumPy's time for a pass
        over a weight, and the compiled update needs its results copied back."""
        raise NotImplementedError

    def moments_of(self) -> Dict[str, List[Parameter]]:
        """{parameter name: its moments (``<prefix>.<kind>.<param name>``), in one order for all}."""
        moments = {p.name: [] for p in self.params}
        for moment in self.state_parameters()[1:]:
            moments[moment.name[len(self.prefix) + 1:].split(".", 1)[1]].append(moment)
        return moments


# ------------------------------------------------------------------------------------------ CAME

def _rms(x: Tensor) -> Tensor:
    return ops.sqrt(divide(_sum_all(x * x), x.size))


def _sum_all(x: Tensor) -> Tensor:
    """Sum of every element, as row sums then their sum: MindSpore 2.10's CPU kernel reducing
    a whole matrix at once runs ~15x slower than this (17 ms against 1.2 ms for 4608x1152)."""
    return ops.sum(ops.sum(x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(1, -1), -1))


def _mean_over(x: Tensor, axis: int) -> Tensor:
    """``ops.mean(x, axis)`` as a sum: MindSpore 2.10's CPU ReduceMean over any axis but the
    last runs ~10x slower than ReduceSum over it."""
    return divide(ops.sum(x, axis), x.shape[axis])


def _ema_of(avg: Tensor, new: Tensor, beta: Tensor, one_minus_beta: Tensor) -> Tensor:
    # 1 - beta arrives precomputed in float64: graph mode would fold it in float32, and
    # 1 - float32(0.999) is off by 1.3e-5 relative.
    return avg * beta + new * one_minus_beta


def _factored_rsqrt(row: Tensor, col: Tensor) -> Tensor:
    """Rank-1 estimate of 1/sqrt(v) from v's row and column means (Adafactor's
    v ~= outer(row, col) / mean(row)): row (..., R), col (..., C) -> (..., R, C)."""
    r_factor = ops.rsqrt(divide(row, ops.expand_dims(_mean_over(row, -1), -1)))
    # an outer product as a matmul over a length-1 axis: one product per element, as the
    # broadcasting Mul's, without the buffer its CPU kernel keeps (pixart.models.pixart.broadcast_as)
    return ops.matmul(ops.expand_dims(r_factor, -1), ops.expand_dims(ops.rsqrt(col), -2))


def _stepped(param: Tensor, update: Tensor, lr: Tensor, weight_decay: Tensor, decays: bool) -> Tensor:
    """``param`` after decoupled weight decay (when ``decays``), then ``param -= lr * update``,
    rounded as the reference's two in-place updates."""
    if decays:
        param = param - param * (lr * weight_decay)
    return param - update * lr


_came_factored = ops.MultitypeFuncGraph("came_factored")
_came_vector = ops.MultitypeFuncGraph("came_vector")


# A type list must have exactly one entry per argument: with one too many, graph mode still
# traces the function but silently drops its assigns (PyNative is unaffected).
@_came_factored.register("Tuple", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _came_factored_step(hparams, lr, param, grad, exp_avg, sq_row, sq_col, res_row, res_col):
    targets = (param, exp_avg, sq_row, sq_col, res_row, res_col)
    return _assigned(targets, _came_factored_values(hparams, lr, param, grad, exp_avg, sq_row, sq_col, res_row, res_col))


def _came_factored_values(hparams, lr, param, grad, exp_avg, sq_row, sq_col, res_row, res_col):
    """CAME for ndim >= 2: second moment and instability kept as row/column means over the
    last two dims. Returns the new (param, exp_avg, sq_row, sq_col, res_row, res_col)."""
    beta1, rest1, beta2, rest2, beta3, rest3, eps1, eps2, clip_threshold, weight_decay, decays = hparams
    sq = grad * grad + eps1
    new_sq_row = _ema_of(sq_row, _mean_over(sq, -1), beta2, rest2)
    new_sq_col = _ema_of(sq_col, _mean_over(sq, -2), beta2, rest2)
    update = _factored_rsqrt(new_sq_row, new_sq_col) * grad
    update = divide(update, ops.maximum(divide(_rms(update), clip_threshold), 1.0))
    new_exp_avg = _ema_of(exp_avg, update, beta1, rest1)
    # Confidence: how far this step's update strays from the momentum it feeds.
    res = ops.square(update - new_exp_avg) + eps2
    new_res_row = _ema_of(res_row, _mean_over(res, -1), beta3, rest3)
    new_res_col = _ema_of(res_col, _mean_over(res, -2), beta3, rest3)
    new_param = _stepped(param, _factored_rsqrt(new_res_row, new_res_col) * new_exp_avg, lr, weight_decay,
                         decays)
    return new_param, new_exp_avg, new_sq_row, new_sq_col, new_res_row, new_res_col


@_came_vector.register("Tuple", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _came_vector_step(hparams, lr, param, grad, exp_avg, exp_avg_sq):
    return _assigned((param, exp_avg, exp_avg_sq), _came_vector_values(hparams, lr, param, grad, exp_avg, exp_avg_sq))


def _came_vector_values(hparams, lr, param, grad, exp_avg, exp_avg_sq):
    """CAME for 1-D tensors: a full second moment and no confidence term (the reference steps
    along the clipped momentum itself). Returns the new (param, exp_avg, exp_avg_sq)."""
    beta1, rest1, beta2, rest2, _, _, eps1, _, clip_threshold, weight_decay, decays = hparams
    new_exp_avg_sq = _ema_of(exp_avg_sq, grad * grad + eps1, beta2, rest2)
    update = ops.rsqrt(new_exp_avg_sq) * grad
    update = divide(update, ops.maximum(divide(_rms(update), clip_threshold), 1.0))
    new_exp_avg = _ema_of(exp_avg, update, beta1, rest1)
    return _stepped(param, new_exp_avg, lr, weight_decay, decays), new_exp_avg, new_exp_avg_sq


def _host_scalars(tensors: Sequence[Tensor]) -> Tuple[np.float32, ...]:
    """The graph's 0-d float32 hyper-parameters as NumPy scalars (float32 arithmetic stays float32)."""
    return tuple(np.float32(t.asnumpy()) for t in tensors)


def _host_mean_over(x: np.ndarray, axis: int) -> np.ndarray:
    return np.sum(x, axis) / np.float32(x.shape[axis])


def _host_factored_rsqrt(row: np.ndarray, col: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``_factored_rsqrt`` into ``out``."""
    r_factor = 1.0 / np.sqrt(row / _host_mean_over(row, -1)[..., None])
    return np.multiply(r_factor[..., None], (1.0 / np.sqrt(col))[..., None, :], out=out)


def _host_clip_by_rms(update: np.ndarray, clip_threshold: np.float32, work: np.ndarray) -> None:
    """``update /= max(rms(update) / clip_threshold, 1)`` (``work``: scratch of its shape)."""
    rms = np.sqrt(np.square(update, out=work).sum() / np.float32(update.size))
    update /= max(rms / clip_threshold, np.float32(1.0))


def _host_stepped(param, update, lr, weight_decay, decays, work) -> None:
    """``_stepped`` in place; ``update`` is overwritten."""
    if decays:
        param -= np.multiply(param, lr * weight_decay, out=work)
    update *= lr
    param -= update


def _came_factored_on_host(hparams, lr, param, grad, exp_avg, sq_row, sq_col, res_row, res_col, scratch):
    """``_came_factored_values`` in place. Its row and column sums add in NumPy's order, not
    MindSpore's: the results agree to float32 rounding, not bit for bit."""
    beta1, rest1, beta2, rest2, beta3, rest3, eps1, eps2, clip_threshold, weight_decay, decays = hparams
    update, work = scratch(param.shape), scratch(param.shape, 1)
    sq = np.multiply(grad, grad, out=work)
    sq += eps1
    sq_row[...] = sq_row * beta2 + _host_mean_over(sq, -1) * rest2
    sq_col[...] = sq_col * beta2 + _host_mean_over(sq, -2) * rest2
    _host_factored_rsqrt(sq_row, sq_col, update)
    update *= grad
    _host_clip_by_rms(update, clip_threshold, work)
    exp_avg *= beta1
    exp_avg += np.multiply(update, rest1, out=work)
    res = np.subtract(update, exp_avg, out=update)
    np.square(res, out=res)
    res += eps2
    res_row[...] = res_row * beta3 + _host_mean_over(res, -1) * rest3
    res_col[...] = res_col * beta3 + _host_mean_over(res, -2) * rest3
    step = _host_factored_rsqrt(res_row, res_col, update)
    step *= exp_avg
    _host_stepped(param, step, lr, weight_decay, decays, work)


def _came_vector_on_host(hparams, lr, param, grad, exp_avg, exp_avg_sq, scratch):
    """``_came_vector_values`` in place."""
    beta1, rest1, beta2, rest2, _, _, eps1, _, clip_threshold, weight_decay, decays = hparams
    exp_avg_sq[...] = exp_avg_sq * beta2 + (grad * grad + eps1) * rest2
    update = 1.0 / np.sqrt(exp_avg_sq) * grad
    _host_clip_by_rms(update, clip_threshold, scratch(param.shape))
    exp_avg[...] = exp_avg * beta1 + update * rest1
    _host_stepped(param, exp_avg.copy(), lr, weight_decay, decays, scratch(param.shape))


class CAME(_Optimizer):
    """CAME (Luo et al. 2023), matching ``came_pytorch.CAME`` 0.1.3 step for step.

    For a parameter of shape S with gradient g:

    * ndim >= 2: the second moment of ``g**2 + eps[0]`` is kept factored, as EMAs (beta2) of
      its row means (shape S[:-1]) and column means (S[:-2] + S[-1:]); the update
      ``g / sqrt(v)`` is scaled down to RMS <= ``clip_threshold`` and averaged into
      ``exp_avg`` (beta1); the step is ``exp_avg / sqrt(r)``, r the factored EMA (beta3) of the
      instability ``(update - exp_avg)**2 + eps[1]``.
    * ndim == 1: unfactored second moment; the step is the clipped ``exp_avg`` itself.
    * ``param -= lr * weight_decay * param`` (decoupled), then ``param -= lr * step``.

    No bias correction, as the reference.  State: ``came.step``, ``came.exp_avg.<name>``, plus
    ``came.exp_avg_sq_row/col.<name>`` and ``came.exp_avg_res_row/col.<name>`` (ndim >= 2) or
    ``came.exp_avg_sq.<name>`` (1-D).  PixArt-Σ: lr 2e-5, weight_decay 0, default betas/eps.
    """

    prefix = "came"

    def __init__(self, params: Iterable[Parameter], lr: float, eps: Tuple[float, float] = (1e-30, 1e-16),
                 clip_threshold: float = 1.0, betas: Tuple[float, float, float] = (0.9, 0.999, 0.9999),
                 weight_decay: float = 0.0):
        super().__init__(params, lr, weight_decay)
        if len(betas) != 3 or not all(0.0 <= b <= 1.0 for b in betas):
            raise ValueError(f"CAME needs three betas in [0, 1], got {betas}")
        if len(eps) != 2:
            raise ValueError(f"CAME needs two eps values, got {eps}")
        decays = tuple(x for b in betas for x in (float(b), 1.0 - float(b)))
        # Tensors, not floats (see _graph_scalars); the last entry picks the weight-decay branch.
        self.hparams = (*_graph_scalars((*decays, *eps, clip_threshold, self.weight_decay)),
                        self.weight_decay != 0.0)

        # Two HyperMaps, one per state layout; grads are split by these constant indices.
        self._matrix_idx = tuple(i for i, p in enumerate(self.params) if p.ndim >= 2)
        self._vector_idx = tuple(i for i, p in enumerate(self.params) if p.ndim < 2)
        matrices = [self.params[i] for i in self._matrix_idx]
        vectors = [self.params[i] for i in self._vector_idx]
        self.matrices = ParameterTuple(matrices)
        self.vectors = ParameterTuple(vectors)
        rows, cols = (lambda s: s[:-1]), (lambda s: s[:-2] + s[-1:])
        self._add_moments("matrix_exp_avg", "exp_avg", matrices)
        self._add_moments("exp_avg_sq_row", "exp_avg_sq_row", matrices, rows)
        self._add_moments("exp_avg_sq_col", "exp_avg_sq_col", matrices, cols)
        self._add_moments("exp_avg_res_row", "exp_avg_res_row", matrices, rows)
        self._add_moments("exp_avg_res_col", "exp_avg_res_col", matrices, cols)
        self._add_moments("vector_exp_avg", "exp_avg", vectors)
        self._add_moments("exp_avg_sq", "exp_avg_sq", vectors)

    def update_params(self, grads, lr, step):
        matrix_grads = tuple(grads[i] for i in self._matrix_idx)
        vector_grads = tuple(grads[i] for i in self._vector_idx)
        matrices_done = _hyper_map(ops.partial(_came_factored, self.hparams, lr),
                                   self.matrices, matrix_grads, self.matrix_exp_avg,
                                   self.exp_avg_sq_row, self.exp_avg_sq_col,
                                   self.exp_avg_res_row, self.exp_avg_res_col)
        vectors_done = _hyper_map(ops.partial(_came_vector, self.hparams, lr),
                                  self.vectors, vector_grads, self.vector_exp_avg, self.exp_avg_sq)
        return matrices_done, vectors_done

    def step_on_host(self, params, grads, moments, lr, step, scratch):
        hparams = _host_scalars(self.hparams[:-1]) + (self.hparams[-1],)
        for param, grad, state in zip(params, grads, moments):
            (_came_factored_on_host if param.ndim >= 2 else _came_vector_on_host)(
                hparams, np.float32(lr), param, grad, *state, scratch=scratch)


# ----------------------------------------------------------------------------------------- AdamW

_adamw = ops.MultitypeFuncGraph("adamw")


@_adamw.register("Tuple", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _adamw_step(hparams, lr, bias_correction1, bias_correction2_sqrt, param, grad, exp_avg, exp_avg_sq):
    return _assigned((param, exp_avg, exp_avg_sq), _adamw_values(hparams, lr, bias_correction1, bias_correction2_sqrt,
                                                                 param, grad, exp_avg, exp_avg_sq))


def _adamw_values(hparams, lr, bias_correction1, bias_correction2_sqrt, param, grad, exp_avg, exp_avg_sq):
    """The new (param, exp_avg, exp_avg_sq)."""
    rest1, beta2, rest2, eps, weight_decay, decays = hparams
    new_param = param * (1.0 - lr * weight_decay) if decays else param
    new_exp_avg = exp_avg + (grad - exp_avg) * rest1  # torch's lerp, same rounding
    new_exp_avg_sq = exp_avg_sq * beta2 + grad * grad * rest2
    denom = divide(ops.sqrt(new_exp_avg_sq), bias_correction2_sqrt) + eps
    new_param = new_param - divide(new_exp_avg, denom) * divide(lr, bias_correction1)
    return new_param, new_exp_avg, new_exp_avg_sq


class AdamW(_Optimizer):
    """Adam with decoupled weight decay, matching ``torch.optim.AdamW`` (amsgrad off)::

        param *= 1 - lr * weight_decay
        m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g**2
        param -= lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    Defaults are torch's.  State: ``adamw.step`` (t), ``adamw.exp_avg.<name>``,
    ``adamw.exp_avg_sq.<name>``.  PixArt-α: lr 2e-5, weight_decay 3e-2, eps 1e-10.
    """

    prefix = "adamw"

    def __init__(self, params: Iterable[Parameter], lr: float, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, lr, weight_decay)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamW needs two betas in [0, 1), got {betas}")
        self.betas = tuple(float(b) for b in betas)
        beta1, beta2 = self.betas
        # Tensors, not floats (see _graph_scalars); the last entry picks the weight-decay branch.
        self.hparams = (*_graph_scalars((1.0 - beta1, beta2, 1.0 - beta2, eps, self.weight_decay)),
                        self.weight_decay != 0.0)
        self._betas = _graph_scalars(self.betas)
        self._add_moments("exp_avg", "exp_avg", self.params)
        self._add_moments("exp_avg_sq", "exp_avg_sq", self.params)

    def _bias_corrections(self, step):
        # float64, as torch's Python-float arithmetic: 1 - 0.999**t loses ~1e-5 in float32.  (The
        # bases are the float32-rounded betas, as a Python float base was: 0.999 -> 0.99900001.)
        t = ops.cast(step, ms.float64)
        return (ops.cast(1.0 - ops.pow(self._betas[0], t), ms.float32),
                ops.cast(ops.sqrt(1.0 - ops.pow(self._betas[1], t)), ms.float32))

    def update_params(self, grads, lr, step):
        bias_correction1, bias_correction2_sqrt = self._bias_corrections(step)
        return _hyper_map(ops.partial(_adamw, self.hparams, lr, bias_correction1, bias_correction2_sqrt),
                          self.params, grads, self.exp_avg, self.exp_avg_sq)

    def step_on_host(self, params, grads, moments, lr, step, scratch):
        rest1, beta2, rest2, eps, weight_decay = _host_scalars(self.hparams[:-1])
        decays, lr = self.hparams[-1], np.float32(lr)
        # as _bias_corrections: float64 powers of the float32 betas, rounded to float32
        beta1_t, beta2_t = (float(np.float32(b)) ** step for b in self.betas)
        step_size = lr / np.float32(1.0 - beta1_t)
        bias_correction2_sqrt = np.float32(math.sqrt(1.0 - beta2_t))
        for param, grad, exp_avg, exp_avg_sq in _piecewise(params, grads, *zip(*moments)):
            # _adamw_values, operation for operation (the same roundings)
            work = scratch(param.shape)
            if decays:
                param *= np.float32(1.0) - lr * weight_decay
            np.subtract(grad, exp_avg, out=work)
            work *= rest1
            exp_avg += work
            exp_avg_sq *= beta2
            np.multiply(grad, grad, out=work)
            work *= rest2
            exp_avg_sq += work
            np.sqrt(exp_avg_sq, out=work)
            work /= bias_correction2_sqrt
            work += eps
            np.divide(exp_avg, work, out=work)
            work *= step_size
            param -= work


# Elements of a piece of a weight over which AdamW's and the EMA's host steps make their passes, so
# that they run in cache (1 MB an array): XL/2, 4 blocks, AdamW 0.15-0.17 s a step against
# 0.21-0.24 s weight by weight.
PIECE = 1 << 18


def _piecewise(*per_parameter):
    """Sequences with an array per parameter (weights, gradients, ...) as tuples of flat views of
    ``PIECE`` elements, one view of each, parameter by parameter."""
    for arrays in zip(*per_parameter):
        flat = [a.reshape(-1) for a in arrays]
        for start in range(0, flat[0].size, PIECE):
            yield tuple(a[start:start + PIECE] for a in flat)


def make_optimizer(name: str, params: Iterable[Parameter], **kwargs) -> _Optimizer:
    """``make_optimizer("came" | "adamw", params, lr=..., ...)``.  The name is case-insensitive
    and PixArt's config spelling ``CAMEWrapper`` means CAME."""
    key = name.lower()
    if key in ("came", "camewrapper"):
        return CAME(params, **kwargs)
    if key == "adamw":
        return AdamW(params, **kwargs)
    raise ValueError(f"unknown optimizer {name!r}; expected 'came' or 'adamw'")


# ------------------------------------------------------------------------------ gradient clipping

_l2_norm = ops.MultitypeFuncGraph("l2_norm")
_scaled = ops.MultitypeFuncGraph("scaled")


@_scaled.register("Tensor", "Tensor")
def _scaled_by(coef, grad):
    return grad * coef


def clip_grad_norm(grads: Tuple[Tensor, ...], max_norm: float) -> Tuple[Tuple[Tensor, ...], Tensor]:
    """``torch.nn.utils.clip_grad_norm_`` (L2, ``error_if_nonfinite=False``), functional.

    total = ||(||g_1||, ..., ||g_n||)||;  every g is multiplied by min(1, max_norm / (total + 1e-6)).
    Returns (clipped grads, total norm before clipping).  Non-finite grads give a non-finite
    total and NaN grads, as torch; skip such steps (see the module docstring).
    """
    coef, total = clip_coefficient(grad_norms(grads), max_norm)
    return scaled(grads, coef), total


def clip_coefficient(norms: Sequence[Tensor], max_norm: float) -> Tuple[Tensor, Tensor]:
    """(min(1, max_norm / (total + 1e-6)), total) from the gradients' ``grad_norms``."""
    total = ops.sqrt(ops.sum(ops.square(ops.stack(norms))))
    return ops.minimum(divide(max_norm, total + 1e-6), 1.0), total


def grad_norms(grads: Tuple[Tensor, ...]) -> Tuple[Tensor, ...]:
    """The L2 norm of each gradient."""
    return _hyper_map(_l2_norm, grads)


def scaled(grads: Tuple[Tensor, ...], coef: Tensor) -> Tuple[Tensor, ...]:
    return _hyper_map(ops.partial(_scaled, coef), grads)


@_l2_norm.register("Tensor")
def _l2_norm_of(grad):
    return ops.sqrt(_sum_all(grad * grad))


# -------------------------------------------------------------------------------------------- EMA

_ema_update = ops.MultitypeFuncGraph("ema_update")


@_ema_update.register("Tuple", "Tensor", "Tensor")
def _ema_update_one(decay, average, param):
    keep, take = decay
    return ops.assign(average, average * keep + param * take)


class EMA(nn.Cell):
    """Exponential moving average of parameters, PixArt-α's ``ema_update``::

        average = decay * average + (1 - decay) * param        (every Parameter, float32)

    Starts as a copy of the parameters (:meth:`reset` copies them again).  ``ema()`` applies one
    update in place, in PyNative or inside a compiled step after the optimizer's update.  The
    averages are Parameters named ``ema.<param name>``: save them with
    ``ms.save_checkpoint(ema.state_parameters(), path)``, restore with
    ``ema.load_state(ms.load_checkpoint(path))``.  For sampling or exporting,
    :meth:`copy_to` writes them into a model and :meth:`averaged_weights` returns them under the
    model's own parameter names.
    """

    def __init__(self, params: Iterable[Parameter], decay: float = 0.9999,
                 averages: Optional[Sequence[Parameter]] = None):
        """``averages``: existing Parameters to keep the averages in, one per param and shaped
        alike (e.g. the weights of a target network that the average drives); default: new ones."""
        super().__init__()
        params = _check_params(params, "EMA")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = (float(decay), 1.0 - float(decay))
        self.params = ParameterTuple(params)
        if averages is None:
            averages = [_state(f"ema.{p.name}", p.asnumpy().copy()) for p in params]
        elif [tuple(a.shape) for a in averages] != [tuple(p.shape) for p in params]:
            raise ValueError("EMA: the given averages are not shaped as the parameters")
        self.averages = ParameterTuple(averages)

    def construct(self):
        return _hyper_map(ops.partial(_ema_update, self.decay), self.averages, self.params)

    def average_on_host(self, averages: Sequence[np.ndarray], params: Sequence[np.ndarray], scratch: Scratch) -> None:
        """``construct`` in NumPy, in place: ``averages`` some of the averages as arrays over their
        memory, ``params`` their parameters (see ``_Optimizer.step_on_host``)."""
        keep, take = (np.float32(d) for d in self.decay)
        for average, param in _piecewise(averages, params):
            average *= keep
            average += np.multiply(param, take, out=scratch(param.shape))

    def reset(self) -> None:
        """Restart the averages from the parameters' current values, e.g. once pretrained weights
        are loaded into a model whose EMA was built before (PixArt-α's ``ema_update(.., 0.)``)."""
        for p, average in zip(self.params, self.averages):
            average.set_data(Tensor(p.asnumpy().copy()))

    def state_parameters(self) -> List[Parameter]:
        return list(self.averages)

    def load_state(self, param_dict: Dict[str, Tensor]) -> None:
        _load_named(self.averages, param_dict, "EMA")

    def averaged_weights(self) -> Dict[str, Tensor]:
        """{model parameter name: averaged value (a copy)}."""
        return {p.name: Tensor(a.asnumpy().copy()) for p, a in zip(self.params, self.averages)}

    def copy_to(self, model: nn.Cell) -> None:
        """Overwrite ``model``'s parameters of the same names with the averages (``model`` may be
        the trained model itself or another instance of its class)."""
        targets = model.parameters_dict()
        missing = [p.name for p in self.params if p.name not in targets]
        if missing:
            raise KeyError(f"EMA.copy_to: the model has no parameters named {missing[:3]} "
                           f"({len(missing)} missing)")
        for p, average in zip(self.params, self.averages):
            target = targets[p.name]
            if tuple(target.shape) != tuple(average.shape):
                raise ValueError(f"EMA.copy_to: {p.name!r} is {tuple(target.shape)} in the model, "
                                 f"{tuple(average.shape)} in the EMA")
            target.set_data(Tensor(average.asnumpy().copy(), dtype=target.dtype))


# ---------------------------------------------------------------------------------- learning rate

def constant_with_warmup(step: int, base_lr: float, warmup_steps: int) -> float:
    """PixArt's ``lr_schedule='constant'``: diffusers' ``get_constant_schedule_with_warmup``.

    ``step`` counts the scheduler steps taken before this update (torch ``LambdaLR``'s
    ``last_epoch``), so the very first update uses lr 0::

        lr = base_lr * step / max(1, warmup_steps)   if step < warmup_steps
             base_lr                                 otherwise

    PixArt's scheduler goes through accelerate, which by default advances it ``world_size``
    times per update and not at all on an fp16-overflow skip: to reproduce a multi-process
    PixArt run pass ``step = completed_updates * world_size``.
    """
    if step < 0 or warmup_steps < 0:
        raise ValueError(f"step and warmup_steps must be >= 0, got {step} and {warmup_steps}")
    if step < warmup_steps:
        return base_lr * float(step) / float(max(1, warmup_steps))
    return base_lr


def auto_scale_lr(base_lr: float, effective_batch_size: int, rule: Optional[str],
                  base_batch_size: int = 256) -> float:
    """PixArt's ``auto_lr`` (``diffusion/utils/optimizer.py: auto_scale_lr``): the lr for an
    effective batch of ``train_batch_size * world_size * gradient_accumulation_steps``.

    rule 'sqrt': base_lr * sqrt(batch / 256); 'linear': base_lr * batch / 256; None: base_lr
    (PixArt's configs without ``auto_lr``; the base config sets ``auto_lr = dict(rule='sqrt')``).
    """
    if effective_batch_size <= 0:
        raise ValueError(f"effective_batch_size must be positive, got {effective_batch_size}")
    if rule is None:
        return base_lr
    if rule == "sqrt":
        return base_lr * math.sqrt(effective_batch_size / base_batch_size)
    if rule == "linear":
        return base_lr * effective_batch_size / base_batch_size
    raise ValueError(f"unknown auto_lr rule {rule!r}; expected 'sqrt', 'linear' or None")
