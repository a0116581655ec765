#!/usr/bin/env python
"""Transformer forward: ours (MindSpore, compiled) vs diffusers (PyTorch), same machine, one run.

XL/2 with random weights, batch 2 (a classifier-free-guidance pair), 300 caption tokens.
Runs are interleaved (ours, theirs, ours, ...) so both see the same machine load; we report
medians, the ratio ours/theirs (<= 1.0 means we are not slower), and achieved GFLOP/s next
to the fp32 GEMM rate each framework reaches in this run on an XL-sized Linear (x W^T).

Our two compiled modes: ``graph`` (the whole model one graph) and ``streamed`` (one block
graph that every block's weights run through; ``sample.py --mode streamed``). ``graph`` is
timed up to ``--graph_max_size`` (XL/2 at 512px needs 5.5 GiB on CPU: bench_forward_memory.py).

    python -m benchmarks.bench_transformer                 # 256px and 512px
    python -m benchmarks.bench_transformer --sizes 256 --repeats 5 --modes graph
"""
import argparse
import os
import statistics
import time

import numpy as np


def forward_flops(tokens: int, caption_tokens: int = 300, hidden: int = 1152, depth: int = 28, batch: int = 2,
                  caption_channels: int = 4096, patch_channels: int = 16, out: int = 32) -> float:
    """Multiply-adds x2 of the GEMMs and attention products of one PixArt forward."""
    n, l, d = tokens, caption_tokens, hidden
    per_block = (2 * n * d * 3 * d + 2 * n * d * d            # self-attention projections
                 + 2 * 2 * n * n * d                           # QK^T and PV
                 + 2 * n * d * d + 2 * l * d * 2 * d + 2 * n * d * d  # cross-attention projections
                 + 2 * 2 * n * l * d                           # cross QK^T and PV
                 + 2 * 2 * n * d * 4 * d)                      # MLP
    outside = 2 * l * caption_channels * d + 2 * l * d * d + 2 * n * patch_channels * d + 2 * n * d * out
    return batch * (depth * per_block + outside)


def forward_inputs(lat: int):
    """(latents (2, 4, lat, lat), timesteps (2,), caption embeddings (2, 300, 4096), caption mask
    (2, 300) with 40 kept tokens) as NumPy arrays: a guided pair's inputs."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, lat, lat)).astype(np.float32)
    t = np.array([500.0, 500.0], np.float32)
    y = rng.standard_normal((2, 300, 4096)).astype(np.float32)
    mask = np.ones((2, 300), np.int64)
    mask[:, 40:] = 0
    return x, t, y, mask


def diffusers_forward(model, x, t, y, mask):
    """``forward()`` -> the output of diffusers' ``PixArtTransformer2DModel`` ``model`` for
    ``forward_inputs``' arrays, as NumPy, without autograd."""
    import torch

    inputs = dict(hidden_states=torch.from_numpy(x), timestep=torch.from_numpy(t),
                  encoder_hidden_states=torch.from_numpy(y), encoder_attention_mask=torch.from_numpy(mask),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)

    def forward():
        with torch.no_grad():
            return model(**inputs)[0].numpy()

    return forward


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sizes (latent = size / 8)")
    ap.add_argument("--repeats", type=int, default=3, help="timed forwards per framework and size")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for both frameworks")
    ap.add_argument("--modes", nargs="+", choices=["graph", "streamed"], default=["graph", "streamed"],
                    help="our execution modes to time (default: both)")
    ap.add_argument("--graph_max_size", type=int, default=512,
                    help="largest size timed in whole-model graph mode (default 512)")
    args = ap.parse_args()

    import mindspore as ms
    import torch
    from diffusers import PixArtTransformer2DModel

    from benchmarks.machine import cpu_description
    from pixart.models.pixart import BlockStreamedForward, Conditioning, PixArtConfig, build_model

    torch.set_num_threads(args.threads)
    ms.set_context(mode=ms.PYNATIVE_MODE)  # as sample.py: ms.jit compiles what runs in graph mode
    ms.set_device("CPU")

    # GEMM rate of the MLP's first Linear at 256px, batch 2, in the form both models run it,
    # x W^T (512 tokens x 1152 -> 4608): MindSpore's plain x @ W of that shape (no transpose)
    # runs at a third of this rate on the Intel AMX machine, so a probe in that form says little
    x = np.random.randn(512, 1152).astype(np.float32)
    w = np.random.randn(4608, 1152).astype(np.float32)
    gemm_flops = 2 * 512 * 1152 * 4608
    tx, tw = torch.from_numpy(x), torch.from_numpy(w)
    mx, mw = ms.Tensor(x), ms.Tensor(w)
    linear = ms.ops.MatMul(transpose_b=True)

    @ms.jit
    def ms_linear(a, b):
        return linear(a, b)

    ms_linear(mx, mw).asnumpy()
    torch_peak = gemm_flops / statistics.median(timed(lambda: torch.nn.functional.linear(tx, tw), 20)) / 1e9
    ms_peak = gemm_flops / statistics.median(timed(lambda: ms_linear(mx, mw).asnumpy(), 20)) / 1e9
    print(f"{cpu_description()}; fp32 GEMM of a Linear (512x1152 by 4608x1152^T): torch {torch_peak:.0f} GFLOP/s, "
          f"mindspore {ms_peak:.0f} GFLOP/s")

    torch_model = PixArtTransformer2DModel(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        cross_attention_dim=1152, sample_size=64, patch_size=2, caption_channels=4096, interpolation_scale=1,
        use_additional_conditions=False).eval()
    config = PixArtConfig(input_size=64, pe_interpolation=1.0)
    model = build_model(config)
    params = dict(model.parameters_and_names())
    from pixart.models.pixart_checkpoint import diffusers_to_official
    for name, value in diffusers_to_official({k: v.numpy() for k, v in torch_model.state_dict().items()}).items():
        params[name].set_data(ms.Tensor(value))
    model.set_train(False)

    @ms.jit
    def graph_forward(x, t, *cond):
        return model(x, t, cond)

    streamed = BlockStreamedForward(model)
    forwards = {"graph": lambda x, t, y, mask: graph_forward(x, t, *Conditioning.of(y, mask)),
                "streamed": lambda x, t, y, mask: streamed(x, t, Conditioning.of(y, mask))}
    rows = []
    for size in args.sizes:
        lat = size // 8
        x, t, y, mask = forward_inputs(lat)
        ms_args = [ms.Tensor(v) for v in (x, t, y, mask)]
        run_theirs = diffusers_forward(torch_model, x, t, y, mask)

        modes = [m for m in args.modes if m != "graph" or size <= args.graph_max_size]
        runs = {m: (lambda f=forwards[m]: f(*ms_args).asnumpy()) for m in modes}
        compile_s, err = {}, {}
        out_theirs = run_theirs()
        for m, run in runs.items():
            start = time.perf_counter()
            out = run()
            compile_s[m] = time.perf_counter() - start
            err[m] = float(np.abs(out - out_theirs).max())
        times = {m: [] for m in [*runs, "theirs"]}
        for _ in range(args.repeats):
            for m, run in runs.items():
                times[m] += timed(run, 1)
            times["theirs"] += timed(run_theirs, 1)
        th = statistics.median(times["theirs"])
        flops = forward_flops((lat // 2) ** 2)
        for m in runs:
            o = statistics.median(times[m])
            rows.append((size, m, o, th, o / th, flops / o / 1e9, flops / th / 1e9, compile_s[m], err[m]))

    print(f"\nXL/2 forward, batch 2, {args.threads} threads, median of {args.repeats} (interleaved)")
    print("| size | our mode | ours (s) | diffusers (s) | ratio ours/diffusers | ours GFLOP/s | diffusers GFLOP/s "
          "| first call incl. compile (s) | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, mode, o, th, ratio, gf_o, gf_t, comp, err in rows:
        print(f"| {size}px | {mode} | {o:.2f} | {th:.2f} | {ratio:.2f} | {gf_o:.0f} | {gf_t:.0f} | {comp:.1f} "
              f"| {err:.1e} |")
    print(f"Linear GEMM rate in this run: mindspore {ms_peak:.0f}, torch {torch_peak:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
