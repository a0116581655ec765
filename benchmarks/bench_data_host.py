#!/usr/bin/env python
"""Host-side cost of a data-parallel run that grows with the data or the number of ranks.

Part 1 — the per-step random draws of one rank (timesteps, diffusion noise, VAE posterior
noise, caption-drop flags) at simulated world sizes: the previous way, one stream per
micro-batch drawn for the whole global batch and sliced (written out here as the baseline),
against ``draw_sample_noise``, one stream per sample drawing the rank's rows alone. Local batch
``--batch`` at 512px (latents 4x64x64), rank 0's draws; median over ``--steps`` micro-batches.

Part 2 — start-up (``load_records``, which every rank runs) on a synthetic label file of
``--records`` records that reference ``--files`` JPEGs of about ``--side`` pixels in turn: sizes
trusted from the labels (the default), labels without sizes (each image header read), and
``--verify_images`` (each image fully decoded). The files are small and hot in the page cache,
so the reading rows are a lower bound on what real images (1-4 MP, on a network disk) cost.

    python -m benchmarks.bench_data_host                  # both parts
    python -m benchmarks.bench_data_host --part 2 --records 20000
"""
import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

LATENT_SHAPE = (4, 64, 64)  # 512px through the 8x VAE
DROP_PROB = 0.1


def global_draw_then_slice(draw_timesteps, seed, index, rank, batch, world, shape, drop_prob):
    """The previous way: one stream per micro-batch, the whole global batch drawn, this rank's
    rows kept (the cost grows with the world size)."""
    g, rows = batch * world, slice(rank * batch, (rank + 1) * batch)
    rng = np.random.default_rng([seed, index])
    t = draw_timesteps(rng, g)[rows].astype(np.int32)
    noise = rng.standard_normal((g,) + shape, dtype=np.float32)[rows]
    posterior_noise = rng.standard_normal((g,) + shape, dtype=np.float32)[rows]
    drop = (rng.random(g) < drop_prob)[rows]
    return t, noise, posterior_noise, drop


def median_ms(draw, steps):
    times = []
    for index in range(steps):
        start = time.perf_counter()
        draw(index)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def part1(batch, steps, worlds):
    from pixart.diffusion.objectives import DiffusionObjective
    from pixart.training.trainer import draw_sample_noise

    draw_timesteps = DiffusionObjective.draw_timesteps
    print(f"\nPer-step random draws of one rank, local batch {batch}, latents {'x'.join(map(str, LATENT_SHAPE))} "
          f"(512px), median of {steps} micro-batches")
    print("| world size | global batch | global draw, then slice (ms) | per-sample streams (ms) | speed-up |")
    print("|---|---|---|---|---|")
    for world in worlds:
        old = median_ms(lambda index: global_draw_then_slice(draw_timesteps, 0, index, 0, batch, world, LATENT_SHAPE,
                                                             DROP_PROB), steps)
        new = median_ms(lambda index: draw_sample_noise(draw_timesteps, 0, index, range(batch), LATENT_SHAPE,
                                                        DROP_PROB), steps)
        print(f"| {world} | {batch * world} | {old:.2f} | {new:.2f} | {old / new:.1f}x |")


def synthetic_labels(folder, records, files, side):
    """``files`` JPEGs of several shapes about ``side`` pixels and a label file of ``records``
    records referencing them in turn, with and without height/width; returns (labels with sizes,
    labels without)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    shapes = [(side * h // 8, side * w // 8) for h, w in ((8, 8), (6, 10), (10, 6), (7, 9))]
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    for i in range(files):
        h, w = shapes[i % len(shapes)]
        pixels = np.kron(rng.integers(0, 256, (h // 8, w // 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # blocky
        Image.fromarray(pixels).save(os.path.join(folder, "images", f"{i:04d}.jpg"), quality=90)
    sized = [{"path": f"{i % files:04d}.jpg", "prompt": f"image {i}", "height": shapes[i % files % len(shapes)][0],
              "width": shapes[i % files % len(shapes)][1]} for i in range(records)]
    paths = []
    for name, entries in (("sized.json", sized),
                          ("unsized.json", [{"path": r["path"], "prompt": r["prompt"]} for r in sized])):
        paths.append(os.path.join(folder, name))
        with open(paths[-1], "w") as f:
            json.dump(entries, f)
    return paths


def part2(records, files, side):
    import logging

    from benchmarks.machine import cpu_description
    from pixart.data.buckets import bucket_table
    from pixart.data.dataset import load_records

    logging.disable(logging.WARNING)  # the per-run summaries
    folder = tempfile.mkdtemp(prefix="bench-data-host-")
    sized, unsized = synthetic_labels(folder, records, files, side)
    images, table = os.path.join(folder, "images"), bucket_table(512)
    print(f"\nStart-up (load_records, on every rank): {records:,} records over {files} JPEGs of about {side}x{side}, "
          f"{cpu_description()}")
    print("| image sizes from | start-up (s) | per record (µs) | records kept |")
    print("|---|---|---|---|")
    for name, labels, verify in (("the labels (default)", sized, False), ("image headers (labels without sizes)",
                                                                          unsized, False),
                                 ("decoded images (--verify_images)", sized, True)):
        start = time.perf_counter()
        kept, _ = load_records(labels, images, table, verify_images=verify)
        elapsed = time.perf_counter() - start
        print(f"| {name} | {elapsed:.2f} | {elapsed / records * 1e6:.0f} | {len(kept):,} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", type=int, choices=[1, 2], help="run only one part")
    ap.add_argument("--batch", type=int, default=2, help="part 1: local batch per rank")
    ap.add_argument("--steps", type=int, default=20, help="part 1: micro-batches timed per row")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 8, 64], help="part 1: simulated world sizes")
    ap.add_argument("--records", type=int, default=100_000, help="part 2: records in the label file")
    ap.add_argument("--files", type=int, default=100, help="part 2: distinct image files they reference")
    ap.add_argument("--side", type=int, default=256, help="part 2: image side in pixels (a multiple of 64)")
    args = ap.parse_args()
    if args.part in (None, 1):
        part1(args.batch, args.steps, args.worlds)
    if args.part in (None, 2):
        part2(args.records, args.files, args.side)


if __name__ == "__main__":
    main()
