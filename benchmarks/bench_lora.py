#!/usr/bin/env python
"""LoRA train step: ours (compiled) against diffusers + peft + torch AdamW, and against our own
full finetune step, with peak memory.

XL/2 width (hidden 1152, 16 heads), 256px, batch 2, fp32, ``--depth`` of the 28 blocks, the
captions of ``bench_train`` (40 of 300 tokens kept; our step leaves out their shared padding,
with the same loss and gradients). LoRA: rank 16, alpha 16, the
official PixArt target list (every linear and the patch-embedding conv). One optimizer step =
forward, the loss, backward, gradient clipping, AdamW over the trained parameters. Each run in
its own process, same machine, one after another; median of the steps after the first two.

    python -m benchmarks.bench_lora                 # depth 4, 6 steps each
    python -m benchmarks.bench_lora --depth 28 --steps 4
"""
import argparse
import os
import time

import numpy as np

RANK = 16


def torch_lora_step_times(steps, depth):
    """diffusers PixArtTransformer2DModel + peft LoRA + torch AdamW over the adapter."""
    import torch
    from diffusers import PixArtTransformer2DModel
    from peft import LoraConfig, get_peft_model

    from benchmarks.bench_train import XL, batch, torch_loss
    from pixart.models.lora_spec import OFFICIAL_TARGETS

    torch.set_num_threads(os.cpu_count())
    model = PixArtTransformer2DModel(**{**XL, "num_layers": depth})
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(OFFICIAL_TARGETS))).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    b = {k: torch.from_numpy(v) for k, v in batch().items()}
    alphas = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))).float()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = torch_loss(model, b, alphas)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        times.append(time.perf_counter() - start)
    return times


def ours_step_times(steps, depth, lora):
    """Our compiled train step: AdamW over the LoRA adapters (frozen base), or over every weight."""
    import mindspore as ms

    from benchmarks.bench_train import batch
    from pixart.models.lora import attach_lora, lora_parameters
    from pixart.models.lora_spec import LoraSpec
    from pixart.models.pixart import PixArtConfig, build_model
    from pixart.training.optim import make_optimizer
    from pixart.training.train_step import TrainStep

    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    model = build_model(PixArtConfig(input_size=32, pe_interpolation=0.5, multi_scale=False, depth=depth))
    if lora:
        params = lora_parameters(attach_lora(model, LoraSpec(r=RANK, lora_alpha=RANK)))
        for p in model.trainable_params():
            p.requires_grad = p.name in {q.name for q in params}
    else:
        params = model.trainable_params()
    step = TrainStep(model, make_optimizer("adamw", params, lr=1e-4), grad_clip=1.0)
    b = batch()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step.update(b, 1e-4)
        times.append(time.perf_counter() - start)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="steps per measurement")
    ap.add_argument("--depth", type=int, default=4, help="transformer blocks (28: the real XL/2)")
    args = ap.parse_args()
    runs = [("PyTorch: diffusers + peft LoRA + torch AdamW", f"torch_lora_step_times({args.steps}, {args.depth})"),
            ("ours, graph, LoRA", f"ours_step_times({args.steps}, {args.depth}, True)"),
            ("ours, graph, full finetune", f"ours_step_times({args.steps}, {args.depth}, False)")]
    from benchmarks.bench_train import machine_line, measure_runs, print_step_table

    rows = measure_runs("benchmarks.bench_lora", runs)
    print(f"\nLoRA train step (rank {RANK}, official targets), XL/2 width, {args.depth} blocks, 256px, batch 2, "
          f"fp32, {machine_line()}; median of steps 3..{args.steps}")
    print_step_table(rows, "ratio to PyTorch LoRA")


if __name__ == "__main__":
    main()
