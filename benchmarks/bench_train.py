#!/usr/bin/env python
"""Training speed: our compiled train step vs PyTorch, and train.py with vs without the feature cache.

Part 1 — one optimizer step (forward + loss + backward + optimizer) of XL/2 at 256px, batch 2,
fp32, captions of 300 tokens keeping 40 (our step leaves out the padding they share, as in
train.py: the same loss and gradients): diffusers' PixArtTransformer2DModel +
torch.optim.AdamW against our step with AdamW (and CAME, what PixArt-Σ uses), compiled (graph),
block by block (streamed, train.py --mode streamed) and eager (pynative). Each runs in its own
process (both at once would not fit in memory), same machine, one run; medians after warm-up;
peak resident memory of each. A run that dies (out of
memory) is reported as such. The full 28 blocks fit in 24 GB in graph mode too (11.7 GiB with
AdamW against PyTorch's 10.8, see the README); ``--depth 4`` gives quicker comparisons.

Part 2 — images/s of train.py on a small synthetic dataset with the VAE and a T5 encoder
run on the fly versus read from tools/cache_features.py's cache (mid-size random models: an
SDXL-sized VAE and a T5-base-sized encoder; with T5-XXL the gap is far larger).

    python -m benchmarks.bench_train             # both parts
    python -m benchmarks.bench_train --part 1 --steps 5
    python -m benchmarks.bench_train --part 1 --depth 28 --steps 4 --modes graph streamed
    python -m benchmarks.bench_train --part 1 --depth 4 --modes graph --micro_batches 2
    python -m benchmarks.bench_train --part 1 --depth 28 --steps 4 --modes graph --recompute
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

XL = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
          cross_attention_dim=1152, sample_size=32, patch_size=2, caption_channels=4096, interpolation_scale=0.5,
          use_additional_conditions=False)


def batch(seed=0):
    rng = np.random.default_rng(seed)
    return dict(x0=rng.standard_normal((2, 4, 32, 32)).astype(np.float32),
                caption=rng.standard_normal((2, 300, 4096)).astype(np.float32),
                caption_mask=np.repeat((np.arange(300) < 40)[None], 2, 0).astype(np.int32),
                t=rng.integers(0, 1000, 2).astype(np.int32),
                noise=rng.standard_normal((2, 4, 32, 32)).astype(np.float32),
                drop_caption=np.zeros(2, bool), resolution=np.zeros((2, 2), np.float32),
                aspect_ratio=np.ones((2, 1), np.float32), control=np.zeros((2, 1, 1, 1), np.float32))


def peak_rss_gb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def torch_step_times(steps, depth, optimizer="adamw", micro_batches=1):
    """diffusers model, eps-MSE + learned-variance output, torch AdamW or came-pytorch's CAME;
    each step accumulates the gradients of ``micro_batches`` forward and backward passes."""
    import torch
    from diffusers import PixArtTransformer2DModel

    torch.set_num_threads(os.cpu_count())
    model = PixArtTransformer2DModel(**{**XL, "num_layers": depth}).train()
    if optimizer == "came":
        from came_pytorch import CAME
        opt = CAME(model.parameters(), lr=2e-5, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=3e-2, eps=1e-10)
    b = {k: torch.from_numpy(v) for k, v in batch().items()}
    alphas = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))).float()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for _ in range(micro_batches):
            (torch_loss(model, b, alphas) / micro_batches).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        opt.step()
        times.append(time.perf_counter() - start)
    return times


def torch_loss(model, b, alphas):
    """eps-MSE + a small term on the learned-variance channels of a diffusers model for batch ``b``
    (torch tensors of ``batch()``)."""
    a = alphas[b["t"].long()].view(-1, 1, 1, 1)
    x_t = a.sqrt() * b["x0"] + (1 - a).sqrt() * b["noise"]
    out = model(x_t, encoder_hidden_states=b["caption"], encoder_attention_mask=b["caption_mask"], timestep=b["t"],
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    return ((out[:, :4] - b["noise"]) ** 2).mean() + out[:, 4:].square().mean() * 1e-3


def ours_step_times(steps, depth, optimizer, mode, micro_batches=1, recompute=False):
    import mindspore as ms
    from pixart.models.pixart import PixArtConfig, build_model
    from pixart.training.optim import make_optimizer
    from pixart.training.streamed_step import StreamedTrainStep
    from pixart.training.train_step import TrainStep

    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    model = build_model(PixArtConfig(input_size=32, pe_interpolation=0.5, multi_scale=False, depth=depth))
    if recompute:
        model.enable_recompute()
    hyper = dict(weight_decay=0.0) if optimizer == "came" else dict(weight_decay=3e-2, eps=1e-10)
    step_class = StreamedTrainStep if mode == "streamed" else TrainStep
    step = step_class(model, make_optimizer(optimizer, model.trainable_params(), lr=2e-5, **hyper), grad_clip=0.01,
                      compiled=mode != "pynative", grad_accumulation=micro_batches)
    b = batch()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        for _ in range(micro_batches - 1):
            step.accumulate(b)
        step.update(b, 2e-5)
        times.append(time.perf_counter() - start)
    return times


def part1(steps, depth, modes, micro_batches=1, recompute=False):
    n, r = micro_batches, recompute
    runs = [("PyTorch (diffusers + torch AdamW)", f"torch_step_times({steps}, {depth}, 'adamw', {n})"),
            ("PyTorch (diffusers + came-pytorch CAME)", f"torch_step_times({steps}, {depth}, 'came', {n})")]
    for mode in modes:
        label = f"{mode}, recompute" if recompute else mode
        runs += [(f"ours, {label}, AdamW", f"ours_step_times({steps}, {depth}, 'adamw', {mode!r}, {n}, {r})"),
                 (f"ours, {label}, CAME", f"ours_step_times({steps}, {depth}, 'came', {mode!r}, {n}, {r})")]
    rows = measure_runs("benchmarks.bench_train", runs)
    accumulated = f", {n} micro-batches a step" if n > 1 else ""
    print(f"\nTrain step, XL/2 width, {depth} blocks, 256px, batch 2{accumulated}, fp32, {machine_line()} "
          f"(median of steps 3..{steps})")
    print_step_table(rows, "ratio to PyTorch AdamW")
    came_pytorch = rows[1][2]
    for name, _, med, _ in rows[2:]:
        if "CAME" in name and med is not None and came_pytorch:
            print(f"{name} / came-pytorch: {med / came_pytorch:.2f}")


def machine_line() -> str:
    """The CPU and both frameworks' GEMM peaks, measured in a fresh process."""
    out = subprocess.run([sys.executable, "-c", "import mindspore as ms; ms.set_device('CPU'); "
                          "from benchmarks.machine import cpu_description, gemm_peaks; "
                          "print(cpu_description() + '; ' + gemm_peaks())"],
                         cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 else "machine: unknown"


def measure_runs(module: str, runs):
    """Each (name, code) run in a fresh process that imports ``module``: code gives the step times.
    Rows (name, first step s, median of the later steps s, peak RSS GiB); None where a run died."""
    rows = []
    for name, code in runs:
        out = subprocess.run([sys.executable, "-c", f"import json; from {module} import *; "
                              f"from benchmarks.bench_train import peak_rss_gb; times = {code}; "
                              f"print('RESULT', json.dumps([times, peak_rss_gb()]))"],
                             cwd=ROOT, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
        if not line:
            why = "killed (out of memory)" if out.returncode in (-9, 137) else f"failed, exit {out.returncode}"
            print(f"{name}: {why}\n{out.stderr[-1500:]}")
            rows.append((name, None, None, None))
            continue
        times, rss = json.loads(line[0][7:])
        rows.append((name, times[0], statistics.median(times[2:] or times[1:]), rss))
    return rows


def print_step_table(rows, ratio_title: str):
    """The rows of ``measure_runs`` as a Markdown table, times relative to the first row's."""
    base = rows[0][2]
    print(f"| implementation | first step incl. compile (s) | step (s) | {ratio_title} | peak RSS (GiB) |")
    print("|---|---|---|---|---|")
    for name, first, med, rss in rows:
        if med is None:
            print(f"| {name} | — | did not run (see above) | — | — |")
        else:
            ratio = f"{med / base:.2f}" if base else "—"
            print(f"| {name} | {first:.1f} | {med:.2f} | {ratio} | {rss:.1f} |")


def part2(steps):
    import torch
    from diffusers import AutoencoderKL
    from transformers import T5Config, T5EncoderModel

    from tests.test_train import make_images

    work = tempfile.mkdtemp(prefix="bench-train-")
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                            feed_forward_proj="gated-gelu")).eval().save_pretrained(os.path.join(work, "t5"))
    AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  sample_size=1024).eval().save_pretrained(os.path.join(work, "vae"))
    from pathlib import Path
    labels, images = make_images(Path(work), sizes=[(256, 256)] * 16)
    model = {"depth": 6, "hidden_size": 384, "num_heads": 6, "caption_channels": 768, "model_max_length": 120,
             "input_size": 32, "pe_interpolation": 0.5}
    tokenizer = os.path.join(os.path.dirname(ROOT), "shared", "t5_tokenizer")
    common = ["--json_path", labels, "--image_dir", images, "--vae_root", f"{work}/vae",
              "--text_encoder_root", f"{work}/t5", "--tokenizer_root", tokenizer, "--model_config", json.dumps(model),
              "--image_size", "256", "--batch_size", "4", "--max_steps", str(steps), "--log_every", "1",
              "--tensorboard", "False", "--progress", "False", "--ckpt_every", "100000", "--optimizer", "adamw",
              "--warmup_steps", "0", "--num_workers", "2"]
    subprocess.run([sys.executable, "tools/cache_features.py", *common, "--feature_cache", f"{work}/cache"],
                   cwd=ROOT, check=True, capture_output=True)
    rates = {}
    for name, extra in (("on the fly (VAE + T5 every step)", []), ("feature cache", ["--feature_cache",
                                                                                     f"{work}/cache"])):
        out = f"{work}/run-{len(rates)}"
        subprocess.run([sys.executable, "train.py", *common, "--output_path", out, *extra], cwd=ROOT, check=True,
                       capture_output=True)
        with open(f"{out}/train_log.csv") as f:
            rows = list(csv.DictReader(f))
        rates[name] = statistics.median(float(r["images_per_s"]) for r in rows[2:])
    base = rates["on the fly (VAE + T5 every step)"]
    print("\ntrain.py images/s, 256px, batch 4, small transformer, SDXL-sized VAE, T5-base-sized encoder")
    print("| features | images/s | speed-up |")
    print("|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.2f} | {rate / base:.1f}x |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", type=int, choices=[1, 2], help="run only one part")
    ap.add_argument("--steps", type=int, default=6, help="steps per measurement")
    ap.add_argument("--depth", type=int, default=28, help="part 1: transformer blocks (default 28, the real XL/2)")
    ap.add_argument("--modes", nargs="+", choices=["graph", "streamed", "pynative"], default=["graph", "pynative"],
                    help="part 1: our execution modes to time")
    ap.add_argument("--micro_batches", type=int, default=1,
                    help="part 1: forward and backward passes whose gradients each step accumulates "
                         "(train.py --grad_accumulation)")
    ap.add_argument("--recompute", action="store_true",
                    help="part 1: our steps recompute each block's attention and MLP activations in the backward "
                         "(train.py --recompute); PyTorch's keep them")
    args = ap.parse_args()
    if args.micro_batches < 1:
        ap.error("--micro_batches must be at least 1")
    if args.part in (None, 1):
        part1(args.steps, args.depth, args.modes, args.micro_batches, args.recompute)
    if args.part in (None, 2):
        part2(args.steps)


if __name__ == "__main__":
    main()
