#!/usr/bin/env python
"""Peak host memory of one XL/2 forward: ours compiled as one graph, ours streamed, diffusers.

Random weights, batch 2 (a classifier-free-guidance pair), 300 caption tokens, fp32. Each run is
a fresh subprocess that builds its model, runs two forwards and reports its peak resident set
size (``VmHWM``) and the time of its second forward; ratios are to diffusers' peak. On CPU,
MindSpore 2.10's runtime reuses the memory of a compiled graph's intermediates, except what
some CPU kernels keep for the life of the graph (a binary op that broadcasts a non-scalar, a
Transpose): the model avoids those where it can (``pixart.models.pixart.broadcast_as``).

    python -m benchmarks.bench_forward_memory                       # 512px, all 28 blocks
    python -m benchmarks.bench_forward_memory --size 256 --depth 4
"""
import argparse
import json
import os
import subprocess
import sys

from benchmarks.machine import cpu_description

GiB = 1024 ** 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def run_one(kind: str, size: int, depth: int) -> dict:
    """In the child process: build, two forwards; the peak RSS and the second forward's time."""
    import time

    from benchmarks.bench_transformer import diffusers_forward, forward_inputs

    lat = size // 8
    x, t, y, mask = forward_inputs(lat)
    if kind == "diffusers":
        from diffusers import PixArtTransformer2DModel

        model = PixArtTransformer2DModel(
            num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=depth,
            cross_attention_dim=1152, sample_size=lat, patch_size=2, caption_channels=4096, interpolation_scale=1,
            use_additional_conditions=False).eval()
        forward = diffusers_forward(model, x, t, y, mask)
    else:
        import mindspore as ms

        from pixart.models.pixart import BlockStreamedForward, Conditioning, PixArtConfig, build_model

        ms.set_context(mode=ms.PYNATIVE_MODE)
        ms.set_device("CPU")
        model = build_model(PixArtConfig(input_size=lat, pe_interpolation=1.0, depth=depth))
        model.set_train(False)
        xt, tt, cond = ms.Tensor(x), ms.Tensor(t), Conditioning.of(ms.Tensor(y), ms.Tensor(mask))

        @ms.jit
        def graph_forward(x, t, *cond):
            return model(x, t, cond)

        streamed = BlockStreamedForward(model)
        if kind == "graph":
            def forward():
                return graph_forward(xt, tt, *cond).asnumpy()
        else:
            def forward():
                return streamed(xt, tt, cond).asnumpy()
    forward()
    start = time.perf_counter()
    forward()
    seconds = time.perf_counter() - start
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return {"peak_kib": int(status["VmHWM"].split()[0]), "seconds": seconds}


def measure(kind: str, size: int, depth: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_forward_memory", "--child", kind,
                          "--size", str(size), "--depth", str(depth)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size / 8)")
    ap.add_argument("--depth", type=int, default=28, help="transformer blocks (default 28, the real XL/2)")
    ap.add_argument("--kinds", nargs="+", choices=["graph", "streamed", "diffusers"],
                    default=["graph", "streamed", "diffusers"], help="what to measure (default: all three)")
    ap.add_argument("--child", choices=["graph", "streamed", "diffusers"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.size, args.depth)))
        return
    results = {kind: measure(kind, args.size, args.depth) for kind in args.kinds}
    reference = results.get("diffusers", {}).get("peak_kib")
    print(f"\nXL/2 forward, {args.depth} blocks, {args.size}px, batch 2, fp32, {cpu_description()}")
    print("| implementation | peak RSS (GiB) | ratio to diffusers | second forward (s) |")
    print("|---|---|---|---|")
    for kind, r in results.items():
        if "error" in r:
            print(f"| {kind} | failed: {r['error']} | | |")
            continue
        ratio = f"{r['peak_kib'] / reference:.2f}" if reference else "-"
        print(f"| {kind} | {r['peak_kib'] * 1024 / GiB:.1f} | {ratio} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
