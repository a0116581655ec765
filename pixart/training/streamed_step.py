"""The train step with the memory of one block: ``train.py --mode streamed``.

A whole-model train graph on MindSpore 2.10's CPU runtime keeps some kernels' buffers for the
life of the graph: the 28-block XL/2 step at 256px, batch 2, takes 11.7 GiB with AdamW (PyTorch
10.8), more at larger sizes. Here the step is a few small graphs run from Python, block by
block, as ``BlockStreamedForward`` does for inference:

1. forward: the embeddings, then each block through one compiled template block (its
   weights copied in), keeping only every block's input tokens (B, N, D);
2. the head and the loss, differentiated: the loss, the gradients of the head's weights and
   of its inputs (the last tokens and the timestep embedding);
3. backward, last block first: one compiled graph copies a block's weights into a template,
   recomputes the block's forward and returns the gradients of its weights and of its inputs
   (tokens, caption tokens, timestep projection); the caption and timestep gradients of all
   blocks add up;
4. the embeddings' weight gradients from those input gradients;
5. clipping by the global norm, the optimizer and the EMA, a block's parameters at a time, in
   NumPy in place on the Parameters' memory, as ``TrainStep`` updates on CPU
   (``TrainStep._prepare_host_update``).

Every block's forward therefore runs twice (per-block recompute): about a third more compute
than the whole-model graph, for the memory of one block's graph plus the weights, their
gradients and the optimizer state. The gradients equal the whole-model step's up to the order
of the floating-point sums (tested).
"""
from __future__ import annotations

from typing import Dict

import mindspore as ms
from mindspore import Tensor, ops

from pixart.diffusion.objectives import DiffusionObjective
from pixart.errors import ConfigError
from pixart.models.pixart import BlockStreamedForward, PixArt, block_template
from pixart.runtime import jit
from pixart.training.train_step import TrainStep, _add_into_one, _mean_and_clear_one


class StreamedTrainStep(TrainStep):
    """``TrainStep`` for the full finetune of a PixArt model with the diffusion loss, run block
    by block (see the module docstring). Same arguments and results as ``TrainStep``; it refuses
    what it does not stream: other objectives or models, adapters or a partly frozen model,
    fp16 loss scaling, dynamic shapes, eager mode."""

    def _compile(self, compiled: bool, dynamic_shapes: bool):
        objective, model = self.objective, self.model
        if not (isinstance(objective, DiffusionObjective) and isinstance(model, PixArt)):
            raise ConfigError("--mode streamed trains a PixArt model with the diffusion loss only "
                              "(not a DiT, a ControlNet or LCM distillation)")
        buffers = {p.name for p in model.get_parameters() if not p.requires_grad and p.name.endswith("y_embedding")}
        if {p.name for p in self.params} != {p.name for p in model.get_parameters()} - buffers:
            raise ConfigError("--mode streamed trains every weight (no LoRA or partly frozen model)")
        if self.loss_scaler is not None or self.reducer is not None or dynamic_shapes or not compiled:
            raise ConfigError("--mode streamed runs one process's fp32 graphs of static shapes (no fp16, "
                              "msrun or --dynamic_shapes)")
        self.streamed = BlockStreamedForward(model)
        block_names = {p.name for block in model.blocks for p in block.get_parameters()}
        head_params = list(model.final_layer.trainable_params())
        embed_params = [p for p in self.params if p.name not in block_names and
                        p.name not in {h.name for h in head_params}]
        self.head_params, self.embed_params = head_params, embed_params
        if not self._weights_on_host():
            raise ConfigError("--mode streamed updates the weights in host memory, which runs on CPU only")
        position = {p.name: i for i, p in enumerate(self.params)}
        self._prepare_host_update([[position[p.name] for p in head_params + embed_params]] +
                                  [[position[p.name] for p in block.get_parameters()] for block in model.blocks])
        loss_fn = objective.loss

        def embed(x0, t, noise, *cond):
            x, t_emb, (y, t6, y_bias) = model.embed(loss_fn.q_sample(x0, t, noise), t, cond)
            return x, t_emb, y, t6, y_bias

        def embed_pullback(dx, dt_emb, dy, dt6, x0, t, noise, *cond):
            x, t_emb, y, t6, _ = embed(x0, t, noise, *cond)
            return (x * dx).sum() + (t_emb * dt_emb).sum() + (y * dy).sum() + (t6 * dt6).sum()

        def head_loss(x, t_emb, x0, t, noise, h, w):
            loss, mse, vb = loss_fn(x0, t, noise, model.head(x, t_emb, h, w))
            return loss.mean(), mse.mean(), vb.mean()

        self._embed = jit(embed)
        self._embed_grads = jit(ms.grad(embed_pullback, None, embed_params))
        self._head_grads = jit(ms.value_and_grad(head_loss, (0, 1), head_params, has_aux=True))
        self._block_grads = {ratio: self._compile_block_grads(ratio) for ratio in set(model.block_kv_ratios())}

    def _compile_block_grads(self, kv_ratio: int):
        """One graph for every block of this KV ratio: (block weights, its input tokens and
        inputs, the gradient of its output) -> ((d tokens, d caption, d t6), d weights)."""
        template, slots = block_template(self.model, kv_ratio)

        def block_pullback(dout, x, y, t6, y_bias, h, w):
            return (template(x, (y, t6, y_bias), h, w) * dout).sum()

        pullback = ms.grad(block_pullback, (1, 2, 3), slots)

        def block_grads(dout, x, y, t6, y_bias, h, w, *weights):
            for slot, value in zip(slots, weights):
                ops.assign(slot, value)
            return pullback(dout, x, y, t6, y_bias, h, w)

        return jit(block_grads)

    # ---------------------------------------------------------------- host side
    def _backward(self, inputs: Dict):
        """(loss, mse, vb, gradients in the optimizer's parameter order) of one micro-batch."""
        model = self.model
        x0, t, noise, *cond = self._tensors(inputs)
        h, w = model.token_grid(x0)
        x, t_emb, y, t6, y_bias = self._embed(x0, t, noise, *cond)
        block_inputs = []

        def run_block(index, x, block_in, h, w):
            block_inputs.append(x)
            return self.streamed._run_block(index, x, block_in, h, w)

        x = model.run_blocks(x, (y, t6, y_bias), h, w, run_block=run_block)
        (loss, mse, vb), ((dx, dt_emb), head_grads) = self._head_grads(x, t_emb, x0, t, noise, h, w)
        grads = [None] * len(self.params)
        self._place(grads, self.head_params, head_grads)
        dy = dt6 = None
        for block, x in zip(reversed(model.blocks), reversed(block_inputs)):
            weights = list(block.get_parameters())
            (dx, dy_block, dt6_block), weight_grads = self._block_grads[block.attn.kv_ratio](
                dx, x, y, t6, y_bias, h, w, *(Tensor(p) for p in weights))
            dy = dy_block if dy is None else dy + dy_block
            dt6 = dt6_block if dt6 is None else dt6 + dt6_block
            self._place(grads, weights, weight_grads)
        self._place(grads, self.embed_params, self._embed_grads(dx, dt_emb, dy, dt6, x0, t, noise, *cond))
        return loss, mse, vb, grads

    def accumulate(self, inputs: Dict) -> Dict[str, float]:
        loss, mse, vb, grads = self._backward(inputs)
        for buffer, grad in zip(self.accum, grads):
            _add_into_one(buffer, grad)
        return {**self._named((loss, mse, vb)), "grad_norm": float("nan"), "loss_scale": 1.0}

    def update(self, inputs: Dict, lr: float) -> Dict[str, float]:
        loss, mse, vb, grads = self._backward(inputs)
        if self.accumulation > 1:
            grads = [_mean_and_clear_one(float(self.accumulation), buffer, grad)
                     for buffer, grad in zip(self.accum, grads)]
        norm = self._update_on_host(lr, grads)
        return {**self._named((loss, mse, vb)), "grad_norm": float(norm.asnumpy()), "loss_scale": 1.0}
