#!/usr/bin/env python
"""Graph compilations in a multi-bucket run, and what MindSpore offers against them.

A multi-scale run compiles its train step once per bucket shape (and once more per shape for the
accumulate-only step with gradient accumulation), and again in every new process, a resumed run
included. This times two epochs over ``--buckets`` bucket shapes of a PixArt-MS (``--width small``
by default: the same code path as XL, compile time grows with the graph; ``--width xl`` shows the
cost per step at XL/2's width) in a fresh process per variant:

* ``static``: what train.py does by default (``pixart.runtime.jit``, one graph per shape);
* ``dynamic_shapes``: train.py ``--dynamic_shapes`` (one graph with a symbolic latent height and
  width, ``TrainStep(dynamic_shapes=True)``);
* ``ms.jit(dynamic=1)``: MindSpore's automatic dynamic-shape compilation;
* ``cache, cold`` / ``cache, warm``: MindSpore's persistent compile cache
  (``MS_COMPILER_CACHE_ENABLE``), written by one process and read by the next.

A step slower than 5x the median of the second epoch counts as a compilation. Every variant's
losses are compared with ``static``'s: the same batches must give the same losses.

    python -m benchmarks.bench_compile
    python -m benchmarks.bench_compile --width xl --depth 2 --buckets 3 --variants dynamic_shapes
"""
import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (latent height, latent width) of bucket shapes of a 256px table, in visiting order
BUCKET_SHAPES = [(32, 32), (28, 36), (36, 28), (24, 40), (40, 24), (26, 38), (38, 26), (22, 46)]
WIDTHS = {"small": dict(hidden_size=256, num_heads=4), "xl": dict(hidden_size=1152, num_heads=16)}  # XL/2: 72 per head
VARIANTS = ("static", "dynamic_shapes", "ms.jit(dynamic=1)", "cache")


def run_variant(variant: str, buckets: int, depth: int, width: str) -> dict:
    """Two epochs over the bucket shapes in this process: per-step seconds and losses."""
    import mindspore as ms
    from mindspore import Tensor

    from pixart import runtime
    from pixart.models.pixart import Conditioning, PixArtConfig, build_model
    from pixart.training import train_step
    from pixart.training.optim import make_optimizer

    runtime.setup_device("CPU")
    if variant == "ms.jit(dynamic=1)":
        train_step.jit = functools.partial(ms.jit, dynamic=1)
    config = PixArtConfig(input_size=32, depth=depth, caption_channels=64, model_max_length=8, multi_scale=True,
                          micro_condition=False, **WIDTHS[width])
    model = build_model(config)
    rng = np.random.default_rng(5)
    for p in model.get_parameters():
        p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.05))
    step = train_step.TrainStep(model, make_optimizer("adamw", model.trainable_params(), lr=1e-4),
                                dynamic_shapes=variant == "dynamic_shapes")
    times, losses = [], []
    for epoch in range(2):
        for k, (h, w) in enumerate(BUCKET_SHAPES[:buckets]):
            draw = np.random.default_rng([epoch, k])
            cond = Conditioning.of(draw.standard_normal((2, 8, 64)).astype(np.float32), np.ones((2, 8), np.int64))
            batch = dict(x0=draw.standard_normal((2, 4, h, w)).astype(np.float32), t=np.array([5, 900], np.int32),
                         noise=draw.standard_normal((2, 4, h, w)).astype(np.float32),
                         **{name: value.asnumpy() for name, value in cond._asdict().items()})
            start = time.perf_counter()
            losses.append(step.update(batch, 1e-4)["loss"])
            times.append(time.perf_counter() - start)
    return dict(times=times, losses=losses)


def in_subprocess(variant: str, args, env_extra: dict) -> dict:
    out = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    env = dict(os.environ, **env_extra)
    subprocess.run([sys.executable, "-m", "benchmarks.bench_compile", "--worker", variant, "--out", out,
                    "--buckets", str(args.buckets), "--depth", str(args.depth), "--width", args.width], cwd=ROOT,
                   env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as f:
        result = json.load(f)
    os.remove(out)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--buckets", type=int, default=6, choices=range(1, len(BUCKET_SHAPES) + 1), metavar="N",
                   help=f"bucket shapes per epoch (1..{len(BUCKET_SHAPES)})")
    p.add_argument("--depth", type=int, default=4, help="transformer blocks")
    p.add_argument("--width", choices=sorted(WIDTHS), default="small",
                   help="small: hidden 256, 4 heads; xl: PixArt-XL/2's hidden 1152, 16 heads")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="what to run (cache: a cold then a warm run); static always runs, as the reference")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        with open(args.out, "w") as f:
            json.dump(run_variant(args.worker, args.buckets, args.depth, args.width), f)
        return

    from benchmarks.machine import cpu_description

    cache = tempfile.mkdtemp(prefix="ms-compile-cache-")
    cached = {"MS_COMPILER_CACHE_ENABLE": "1", "MS_COMPILER_CACHE_PATH": cache}
    runs = {"static": in_subprocess("static", args, {})}
    runs.update({variant: in_subprocess(variant, args, {}) for variant in ("dynamic_shapes", "ms.jit(dynamic=1)")
                 if variant in args.variants})
    if "cache" in args.variants:
        runs.update({"cache, cold": in_subprocess("static", args, cached),
                     "cache, warm": in_subprocess("static", args, cached)})
    reference = np.array(runs["static"]["losses"])
    n = args.buckets
    width = WIDTHS[args.width]
    print(f"{cpu_description()}; {n} bucket shapes x 2 epochs, PixArt-MS depth {args.depth}, hidden "
          f"{width['hidden_size']}, {width['num_heads']} heads, batch 2")
    print("| variant | compilations seen | epoch 1 (s) | epoch 2 (s) | median step, epoch 2 (s) | "
          "max loss difference vs static |")
    print("|---|---|---|---|---|---|")
    for name, run in runs.items():
        times = run["times"]
        steady = statistics.median(times[n:])
        compiled = sum(t > 5 * steady for t in times)
        losses = np.array(run["losses"])
        diff = float(np.nanmax(np.abs(losses - reference))) if np.isfinite(losses).all() else float("nan")
        print(f"| {name} | {compiled} | {sum(times[:n]):.1f} | {sum(times[n:]):.1f} | {steady:.2f} | "
              f"{'NaN losses' if np.isnan(diff) else f'{diff:.1e}'} |")


if __name__ == "__main__":
    main()
