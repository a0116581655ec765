"""The compiled training step.

``update`` = the objective's loss (by default the IDDPM loss of the transformer's prediction)
+ backward, as one graph per input shape (one per bucket), or with ``dynamic_shapes`` one graph
for every latent height and width; then all-reduce of the gradients across ranks + clipping by
global norm + optimizer + EMA, as one graph for every shape (its inputs are shaped as the
parameters). The update is most of a compile (the tiny test model's AdamW step: 13 of 18.5 s),
so a further bucket costs only its forward and backward. Where the weights live in host memory
(CPU) and neither ranks nor fp16 loss scaling are involved, the update after the backward runs
in NumPy in place instead (``TrainStep._prepare_host_update``): faster, without the update
graph's buffers, and with the same numbers. With gradient accumulation,
``accumulate`` runs forward and backward of the other micro-batches and adds their gradients to
buffers that ``update`` consumes. fp16 scales the loss dynamically and skips steps whose gradients overflow.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from pixart.diffusion.objectives import DiffusionObjective
from pixart.errors import ConfigError
from pixart.models.pixart import use_symbolic_grid
from pixart.models.text_encoder import unpadded_length
from pixart.runtime import host_threads, jit
from pixart.training.optim import EMA, Scratch, clip_coefficient, clip_grad_norm, divide, grad_norms

BATCH_FIELDS = ("x0", "t", "noise")  # then the model's conditioning fields: the compiled step's inputs, in order

_add_into = ops.MultitypeFuncGraph("add_into")
_mean_and_clear = ops.MultitypeFuncGraph("mean_and_clear")


@_add_into.register("Tensor", "Tensor")
def _add_into_one(buffer, grad):
    return ops.assign_add(buffer, grad)


@_mean_and_clear.register("Number", "Tensor", "Tensor")
def _mean_and_clear_one(count, buffer, grad):
    """(buffered + this micro-batch's gradient) / count, and empty the buffer."""
    total = divide(buffer + grad, count)
    return ops.depend(total, ops.assign(buffer, ops.zeros_like(buffer)))


def host_float(value: Tensor) -> float:
    """A scalar output of a compiled step as a float, read through a copy op. The step's graph
    runs asynchronously; MindSpore 2.10's ``asnumpy()`` on one of its outputs waits for it in a
    way that made the graph itself about twice as slow on CPU (XL/2, 4 blocks: ``accumulate``
    2.6-3.1 s a micro-batch against 1.4-1.6 s, both cores busy either way), where an op waiting
    for its input costs nothing."""
    return float(value.copy().asnumpy())


class _Graph(nn.Cell):
    """``body(*inputs)`` as a cell, the form whose inputs ``set_inputs`` can declare symbolic."""

    def __init__(self, body):
        super().__init__(auto_prefix=False)
        self.body = body

    def construct(self, *inputs):
        return self.body(*inputs)


def _compiled_for_any_latent_size(body):
    """``body`` compiled once, at its first call, for inputs shaped as that call's except the
    last two dimensions of 4-D inputs (latent height and width), which stay symbolic."""
    graph, compiled = _Graph(body), []

    def call(*inputs):
        if not compiled:
            graph.set_inputs(*(Tensor(shape=[*x.shape[:2], None, None] if x.ndim == 4 else x.shape, dtype=x.dtype)
                               for x in inputs))
            compiled.append(jit(graph))
        return compiled[0](*inputs)
    return call


class TrainStep:
    """One optimizer step over the parameters ``optimizer`` trains; every other parameter of
    ``model`` stays frozen (a LoRA or control branch trains a subset of a frozen base).

    Args:
        model: the transformer, called as ``model(x_t, t, conditioning)``.
        optimizer: a ``pixart.training.optim`` optimizer over the trained parameters.
        objective: what the step minimises (``pixart.diffusion.objectives``; default: the IDDPM
            loss of ``model``).
        ema_decay: EMA of the trained parameters (0: none).
        ema_into: Parameters to keep the EMA in, one per trained parameter (a target network's);
            default: new ones.
        grad_clip: max global gradient norm (0: no clipping).
        grad_accumulation: micro-batches per update (``accumulate`` runs the others).
        loss_scale: initial dynamic loss scale for fp16 (None: no loss scaling).
        world: data-parallel ranks whose gradients are averaged.
        compiled: compile each step with ``ms.jit`` (False: eager, for debugging).
        dynamic_shapes: compile ``update`` and ``accumulate`` once each for every latent height
            and width (``pixart.models.pixart.use_symbolic_grid``) instead of once per bucket
            shape; the batch size and the other inputs' shapes stay those of the first call.
    """

    def __init__(self, model, optimizer, objective=None, ema_decay: float = 0.0, ema_into=None,
                 grad_clip: float = 0.0, grad_accumulation: int = 1, loss_scale: Optional[float] = None,
                 world: int = 1, compiled: bool = True, dynamic_shapes: bool = False):
        self.model = model
        self.input_order = BATCH_FIELDS + model.conditioning._fields
        self.objective = objective or DiffusionObjective(model)
        self.metric_names = ("loss",) + self.objective.metric_names
        self.optimizer = optimizer
        self.params = list(optimizer.params)
        self.ema = EMA(self.params, ema_decay, ema_into) if ema_decay > 0 else None
        self.grad_clip = float(grad_clip) if grad_clip > 0 else float("inf")
        self.accumulation = int(grad_accumulation)
        if self.accumulation > 1:
            self.accum = ms.ParameterTuple(
                [Parameter(Tensor(np.zeros(p.shape, np.float32)), name=f"accum.{p.name}", requires_grad=False)
                 for p in self.params])
        self.reducer = nn.DistributedGradReducer(self.params, mean=True, degree=world) if world > 1 else None
        self.loss_scaler = None
        if loss_scale is not None:
            self.loss_scaler = ms.amp.DynamicLossScaler(scale_value=loss_scale, scale_factor=2, scale_window=2000)
        self.hyper_map = ops.HyperMap()
        self.dynamic_shapes = dynamic_shapes
        self._compile(compiled, dynamic_shapes)
        model.set_train(True)

    def _compile(self, compiled: bool, dynamic_shapes: bool):
        """Set ``_gradients(*batch)``, ``_apply(lr, loss, *metrics, *grads)`` and ``_accumulate(*batch)``."""
        self.grad_fn = ms.value_and_grad(self._scaled_loss, None, self.params, has_aux=True)
        if dynamic_shapes and not use_symbolic_grid(self.objective):
            raise ConfigError("dynamic shapes need a PixArt-MS model (a DiT runs at one size)")
        compile_graph = _compiled_for_any_latent_size if dynamic_shapes else jit
        self._gradients = compile_graph(self._gradients_graph) if compiled else self._gradients_graph
        self._apply = jit(self._apply_graph) if compiled else self._apply_graph
        self._accumulate = compile_graph(self._accumulate_graph) if compiled else self._accumulate_graph
        self.host_update = compiled and self.loss_scaler is None and self.reducer is None and self._weights_on_host()
        if self.host_update:
            self._prepare_host_update()

    # ---------------------------------------------------------------- the update in host memory
    def _weights_on_host(self) -> bool:
        """Whether the trained float32 weights and their optimizer state are arrays in host
        memory (CPU), which ``Parameter.asnumpy()`` then shares rather than copies."""
        state = self.params + self.optimizer.state_parameters()[1:]
        return (all(p.dtype == ms.float32 for p in state) and
                all(np.shares_memory(p.asnumpy(), p.asnumpy()) for p in (self.params[0], state[-1])))

    def _prepare_host_update(self, groups=()):
        """The clipping, optimizer and EMA after the backward run in NumPy, in place on the
        weights' memory (``optimizer.step_on_host``, ``ema.average_on_host``), a parameter per
        task of a pool of threads: MindSpore 2.10's CPU elementwise kernels take 2-4x NumPy's time
        for a pass over a weight, and a compiled update over all weights keeps buffers the size
        of the weights. The gradient norms come from compiled graphs (the same sums as the
        compiled update's clipping): the whole-model step's gradients graph, or for gradients
        computed elsewhere (``StreamedTrainStep``) a graph over each of ``groups`` (lists of
        parameter positions shaped alike, e.g. a block's). AdamW gives the compiled update's
        numbers bit for bit, CAME to float32 rounding (tested)."""
        self.groups = groups
        self.index_of = {p.name: i for i, p in enumerate(self.params)}
        self.moments = self.optimizer.moments_of()

        def group_grad_norms(*grads):  # varargs: a tuple argument would enter the graph as constants
            return grad_norms(grads)

        self._grad_norms = jit(group_grad_norms)
        self.scratch = Scratch()

    def _place(self, values, params, group_values):
        for param, value in zip(params, group_values):
            values[self.index_of[param.name]] = value

    def _update_on_host(self, lr: float, grads, norms=None) -> Tensor:
        """Clipping, optimizer and EMA of ``_optimize`` for ``grads`` (a list in the parameters'
        order; each is dropped once handed over) and their ``grad_norms`` where already computed
        (else a graph per group computes them). Returns the gradient norm. Threads update
        different parameters at once (NumPy releases the GIL in its passes over an array): one
        core does not saturate the memory bandwidth these passes are bound by (XL/2, 4 blocks,
        AdamW: 0.46 s on one thread, 0.26 s on two)."""
        if norms is None:
            norms = [None] * len(grads)  # in the parameters' order, as the compiled clipping sums them
            for group in self.groups:
                self._place(norms, [self.params[i] for i in group], self._grad_norms(*(grads[i] for i in group)))
        coef, total = clip_coefficient(norms, self.grad_clip)
        coef, step = np.float32(coef.asnumpy()), int(self.optimizer.count_step().asnumpy())
        jobs = []
        for i, param in enumerate(self.params):
            average = None if self.ema is None else self.ema.averages[i].asnumpy()
            jobs.append((param.asnumpy(), grads[i].asnumpy(), [m.asnumpy() for m in self.moments[param.name]], average))
            grads[i] = None

        def update(job):
            param, grad, moments, average = job
            grad *= coef
            self.optimizer.step_on_host([param], [grad], [moments], lr, step, self.scratch)
            if average is not None:
                self.ema.average_on_host([average], [param], self.scratch)

        for _ in host_threads().map(update, jobs):  # iterating re-raises a thread's exception
            pass
        return total

    # ---------------------------------------------------------------- graph bodies
    def _scaled_loss(self, x0, t, noise, *cond):
        loss, *metrics = self.objective(x0, t, noise, cond)
        scaled = loss if self.loss_scaler is None else self.loss_scaler.scale(loss)
        return (scaled, loss, *metrics)

    def _accumulate_graph(self, *batch):
        (_, loss, *metrics), grads = self.grad_fn(*batch)
        loss = ops.depend(loss, self.hyper_map(_add_into, self.accum, grads))
        return (loss, *metrics)

    def _gradients_graph(self, *batch):
        """(loss, *metrics, *gradients of the trained parameters), averaged over the micro-batches;
        for the host update then their norms too: in this graph they cost no launches of their own
        (a graph per block's group took 86 ms of a 1.2 s LoRA step, most of it for tiny tensors)."""
        (_, loss, *metrics), grads = self.grad_fn(*batch)
        if self.accumulation > 1:
            grads = self._averaged(grads)
        if self.host_update:
            return (loss, *metrics, *grads, *grad_norms(grads))
        return (loss, *metrics, *grads)

    def _apply_graph(self, lr, loss, *metrics_and_grads):
        """``_optimize`` of ``_gradients``' outputs (varargs: a tuple argument would enter the graph
        as constants)."""
        count = len(self.metric_names) - 1
        return self._optimize(lr, metrics_and_grads[count:], loss, metrics_and_grads[:count])

    def _averaged(self, grads):
        """(the accumulated gradients + this micro-batch's) / micro-batches; empties the buffers."""
        return self.hyper_map(ops.partial(_mean_and_clear, float(self.accumulation)), self.accum, grads)

    def _optimize(self, lr, grads, loss, metrics):
        """The step after the backward: all-reduce, unscale, clip, optimizer, EMA, loss scale;
        returns (loss, *metrics, gradient norm)."""
        if self.reducer is not None:
            grads = self.reducer(grads)
        finite = True
        if self.loss_scaler is not None:
            grads = self.loss_scaler.unscale(grads)
            finite = ms.amp.all_finite(grads)
        grads, norm = clip_grad_norm(grads, self.grad_clip)
        if finite:  # an overflowed fp16 step leaves weights, optimizer state and EMA untouched
            loss = ops.depend(loss, self.optimizer(grads, lr))
            if self.ema is not None:
                loss = ops.depend(loss, self.ema())
        if self.loss_scaler is not None:
            loss = ops.depend(loss, self.loss_scaler.adjust(finite))
        return (loss, *metrics, norm)

    # ---------------------------------------------------------------- host side
    def _tensors(self, inputs: Dict[str, np.ndarray]):
        """The batch as the graphs take it, in ``input_order``. Captions lose the padding that
        every row has (``unpadded_length``): a padded token's attention weight is exactly 0, so
        the loss and gradients are the same and the cross-attention's work on it is saved (XL/2
        width, 256px, 40 of 300 tokens kept: about 15% of a step). Each caption length step
        compiles its own graphs, except with dynamic shapes, whose graphs keep the first call's
        caption length."""
        mask = inputs.get("caption_mask")
        if mask is not None and not self.dynamic_shapes:
            keep = unpadded_length(mask)
            inputs = {**inputs, "caption": inputs["caption"][:, :keep], "caption_mask": mask[:, :keep]}
        return [None if inputs.get(k) is None else Tensor(inputs[k]) for k in self.input_order]

    def accumulate(self, inputs: Dict[str, np.ndarray]) -> Dict[str, float]:
        values = self._accumulate(*self._tensors(inputs))
        return {**self._named(values), "grad_norm": float("nan"), "loss_scale": self.loss_scale}

    def update(self, inputs: Dict[str, np.ndarray], lr: float) -> Dict[str, float]:
        outputs = self._gradients(*self._tensors(inputs))
        if self.host_update:
            count, trained = len(self.metric_names), len(self.params)
            values = outputs[:count]
            norm = self._update_on_host(lr, list(outputs[count:count + trained]), outputs[count + trained:])
        else:
            *values, norm = self._apply(Tensor(np.float32(lr)), *outputs)
        return {**self._named(values), "grad_norm": float(norm.asnumpy()), "loss_scale": self.loss_scale}

    def _named(self, values) -> Dict[str, float]:
        return {name: host_float(v) for name, v in zip(self.metric_names, values)}

    @property
    def loss_scale(self) -> float:
        return 1.0 if self.loss_scaler is None else float(self.loss_scaler.scale_value.asnumpy())

    def reset_ema(self):
        if self.ema is not None:
            self.ema.reset()

    def ema_weights(self, weights: Dict[str, np.ndarray]) -> Optional[Dict[str, np.ndarray]]:
        """``weights`` (name -> array) with the trained parameters among them replaced by their
        EMA (None without EMA)."""
        if self.ema is None:
            return None
        averaged = dict(weights)
        for param, avg in zip(self.params, self.ema.averages):
            if param.name in averaged:
                averaged[param.name] = avg.asnumpy()
        return averaged

    def optimizer_state(self) -> Dict[str, np.ndarray]:
        return {p.name: p.asnumpy() for p in self.optimizer.state_parameters()}

    def load_state(self, optimizer: Dict[str, np.ndarray], ema: Optional[Dict[str, np.ndarray]], state: dict):
        self.optimizer.load_state({k: Tensor(v) for k, v in optimizer.items()})
        if self.loss_scaler is not None:
            self.loss_scaler.scale_value.set_data(Tensor(np.float32(state["loss_scale"])))
        if self.ema is not None:
            if ema is None:
                raise ValueError("the checkpoint has no EMA weights but --ema_decay is set")
            for param, avg in zip(self.params, self.ema.averages):
                avg.set_data(Tensor(ema[param.name]))

