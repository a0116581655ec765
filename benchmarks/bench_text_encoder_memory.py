#!/usr/bin/env python
"""Peak host memory of text-to-image inference: staged text encoding vs all models at once.

Random weights, saved to real files first: a mid-size T5 v1.1 encoder (sharded safetensors,
0.5B parameters), the real PixArt-Σ XL/2 transformer (0.6B, a converted ``.ckpt``) and an
SDXL-sized VAE (84M). Each mode runs in a fresh subprocess that reports its peak resident set
size (``VmHWM``; ``ru_maxrss`` would include the parent's memory at fork time):

    text          tokenizer + T5: load, encode prompt and negative prompt, save embeddings
    image         transformer + VAE: load, one denoising forward (batch 2), one decode; at
                  128px (16x16 latents) to keep it quick: the weights dominate memory anyway
    staged        ``encode_prompts_staged`` then transformer + VAE, in one process
    all-at-once   T5, transformer and VAE loaded together, then the same work

    python -m benchmarks.bench_text_encoder_memory            # about 6 minutes on 2 busy cores
    python -m benchmarks.bench_text_encoder_memory --t5 small  # a 0.04B T5, about 3 minutes
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(os.path.dirname(ROOT), "shared", "t5_tokenizer")
T5_SIZES = {  # T5 v1.1 shapes; XXL is d_model 4096, d_ff 10240, 64 heads, 24 layers (4.76B)
    "small": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=8),
    "mid": dict(d_model=1280, d_kv=64, d_ff=3328, num_layers=24, num_heads=20),
}
T5_XXL_PARAMS = 4_762_310_656
SDXL_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
                sample_size=1024, scaling_factor=0.13025, force_upcast=True,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
TRANSFORMER = "PixArt-Sigma-XL-2-512-MS"  # multi-scale: runs at any latent size
LATENT = 16
MAX_LENGTH = 300
PROMPTS = ["a watercolor painting of a lighthouse on a cliff at dawn, seagulls, soft light", ""]
GiB = 1024 ** 3


# ---------------------------------------------------------------- setup (parent process)

def write_random_folder(cell, folder, weights_name, config, shard_bytes=1 << 30, seed=0):
    """Save ``cell``'s parameter names and shapes with random N(0, 0.02) values as a
    Hugging Face folder (sharded with an index once it exceeds ``shard_bytes``)."""
    from pixart.utils.safetensors_io import save_file

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    shards, current, size = [], {}, 0
    for name, param in cell.parameters_and_names():
        current[name] = (0.02 * rng.standard_normal(param.shape, dtype=np.float32))
        size += current[name].nbytes
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, f"{weights_name}.safetensors"))
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        shard_name = f"{weights_name}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, shard_name))
        weight_map.update(dict.fromkeys(shard, shard_name))
    with open(os.path.join(folder, f"{weights_name}.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def setup(workdir, t5_size):
    import mindspore as ms
    from pixart.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
    from pixart.models.pixart import PRESETS, build_model
    from pixart.models.pixart_checkpoint import save_mindspore_checkpoint
    from pixart.models.t5 import T5Config, T5Encoder

    ms.set_device("CPU")
    t5_config = dict(vocab_size=32128, feed_forward_proj="gated-gelu", **T5_SIZES[t5_size])
    write_random_folder(T5Encoder(T5Config(**t5_config)), os.path.join(workdir, "text_encoder"), "model",
                        {"model_type": "t5", **t5_config})
    write_random_folder(AutoencoderKL(AutoencoderKLConfig(**SDXL_VAE)), os.path.join(workdir, "vae"),
                        "diffusion_pytorch_model", {"_class_name": "AutoencoderKL", **SDXL_VAE})
    config = PRESETS[TRANSFORMER]
    model = build_model(config)
    state = {name: p.asnumpy() for name, p in model.parameters_and_names()}
    save_mindspore_checkpoint(state, config, os.path.join(workdir, "transformer.ckpt"))
    del model, state
    gc.collect()


def folder_bytes(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.endswith((".safetensors", ".ckpt")))


# ---------------------------------------------------------------- stages (child processes)

def rss_gb():
    return _status_gb("VmRSS")


def _status_gb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / GiB
    raise RuntimeError(f"no {field} in /proc/self/status (this benchmark needs Linux)")


def peak_gb():
    return _status_gb("VmHWM")


def load_text(workdir):
    from pixart.models.t5 import T5Encoder
    from pixart.models.text_encoder import load_tokenizer
    return load_tokenizer(TOKENIZER), T5Encoder.from_pretrained(os.path.join(workdir, "text_encoder"))


def load_image_models(workdir):
    from pixart.models.autoencoder_kl import AutoencoderKL
    from pixart.models.pixart_checkpoint import load_pixart
    transformer, _ = load_pixart(os.path.join(workdir, "transformer.ckpt"))
    return transformer, AutoencoderKL.from_pretrained(os.path.join(workdir, "vae"))


def run_image(transformer, vae, embeddings, mask):
    """One denoising forward on a (prompt, negative) pair and one decode."""
    from mindspore import Tensor
    cfg = transformer.config
    y = np.resize(embeddings, embeddings.shape[:2] + (cfg.caption_channels,))  # mid T5 width -> 4096
    x = np.random.default_rng(0).standard_normal((2, cfg.in_channels, LATENT, LATENT))
    out = transformer(Tensor(x.astype(np.float32)), Tensor(np.array([500.0, 500.0], np.float32)),
                      Tensor(y.astype(np.float32)), Tensor(mask.astype(np.float32)))
    latents = out.asnumpy()[:1, :cfg.in_channels] / vae.scaling_factor
    return vae.decode(Tensor(latents.astype(np.float32))).asnumpy()


def stage(name, workdir):
    import mindspore as ms
    from pixart.models import text_encoder as te

    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    report = {}
    emb_path = os.path.join(workdir, "embeddings.npz")
    if name == "setup":
        setup(workdir, os.environ["BENCH_T5_SIZE"])
    elif name == "baseline":
        pass
    elif name == "text":
        tokenizer, t5 = load_text(workdir)
        emb, mask = te.encode_prompts(PROMPTS, tokenizer, t5, MAX_LENGTH)
        np.savez(emb_path, emb=emb, mask=mask)
    elif name == "image":
        saved = np.load(emb_path)
        run_image(*load_image_models(workdir), saved["emb"], saved["mask"])
    elif name == "staged":
        emb, mask = te.encode_prompts_staged(PROMPTS, os.path.join(workdir, "text_encoder"), TOKENIZER, MAX_LENGTH)
        report["rss_after_release_gb"] = rss_gb()
        run_image(*load_image_models(workdir), emb, mask)
    elif name == "all-at-once":
        tokenizer, t5 = load_text(workdir)
        transformer, vae = load_image_models(workdir)
        emb, mask = te.encode_prompts(PROMPTS, tokenizer, t5, MAX_LENGTH)
        run_image(transformer, vae, emb, mask)
    else:
        raise SystemExit(f"unknown stage {name!r}")
    report["peak_gb"] = peak_gb()
    print("REPORT " + json.dumps(report))


def run_stage(name, workdir, env=None):
    start = time.time()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--stage", name, "--workdir", workdir],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"stage {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads(lines[-1][len("REPORT "):])
    report["seconds"] = time.time() - start
    return report


# ---------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--t5", choices=sorted(T5_SIZES), default="mid")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        return stage(args.stage, args.workdir)
    if not os.path.isdir(TOKENIZER):
        raise SystemExit(f"the T5 tokenizer is missing (expected at {TOKENIZER})")

    with tempfile.TemporaryDirectory(prefix="bench_te_mem_") as workdir:
        t0 = time.time()
        run_stage("setup", workdir, {"BENCH_T5_SIZE": args.t5})  # a child, so this process stays small
        sizes = {k: folder_bytes(os.path.join(workdir, p)) / GiB
                 for k, p in [("t5", "text_encoder"), ("transformer", "transformer.ckpt"), ("vae", "vae")]}
        print(f"random weights written in {time.time() - t0:.0f} s: T5 ({args.t5}) {sizes['t5']:.2f} GiB, "
              f"transformer {sizes['transformer']:.2f} GiB, VAE {sizes['vae']:.2f} GiB (fp32 files)\n")
        r = {name: run_stage(name, workdir) for name in ["baseline", "text", "image", "staged", "all-at-once"]}

    separate = max(r["text"]["peak_gb"], r["image"]["peak_gb"])
    rows = [("runtime only (imports)", r["baseline"]["peak_gb"], r["baseline"]["seconds"]),
            ("text stage: tokenizer + T5", r["text"]["peak_gb"], r["text"]["seconds"]),
            ("image stage: transformer + VAE", r["image"]["peak_gb"], r["image"]["seconds"]),
            ("staged, two processes (max of the two)", separate, r["text"]["seconds"] + r["image"]["seconds"]),
            ("staged, one process (encode_prompts_staged)", r["staged"]["peak_gb"], r["staged"]["seconds"]),
            ("all models loaded at once", r["all-at-once"]["peak_gb"], r["all-at-once"]["seconds"])]
    print(f"{'mode':46s} {'peak RSS GiB':>12s} {'time s':>7s}")
    for label, peak, seconds in rows:
        print(f"{label:46s} {peak:12.2f} {seconds:7.0f}")
    print(f"\nRSS right after the staged text encoder was released: {r['staged']['rss_after_release_gb']:.2f} GiB")

    base = r["baseline"]["peak_gb"]
    text_extra = r["text"]["peak_gb"] - base - sizes["t5"]        # activations, tokenizer, load transients
    xxl = {"fp32": T5_XXL_PARAMS * 4 / GiB, "bf16": T5_XXL_PARAMS * 2 / GiB}
    print(f"\nScaling to T5-XXL (4.76B parameters = {xxl['fp32']:.1f} GiB fp32, {xxl['bf16']:.1f} GiB bf16). The "
          f"text stage is the runtime ({base:.1f} GiB) plus the encoder's weights plus {text_extra:.1f} GiB here "
          f"(tokenizer, activations for 2 x 300 tokens); loading adds no second copy of the weights, because "
          f"shards are read one at a time and each parameter takes over the array read from disk when the "
          f"dtypes match (converting, e.g. fp32 files to bf16, holds one converted tensor at a time). The image "
          f"stage ({r['image']['peak_gb']:.1f} GiB here) does not depend on the text encoder. Staged, the peak is "
          f"therefore about max({base:.1f} + {xxl['fp32']:.1f} + {text_extra:.1f}, {r['image']['peak_gb']:.1f}) = "
          f"{max(base + xxl['fp32'] + text_extra, r['image']['peak_gb']):.1f} GiB with fp32 weights "
          f"({max(base + xxl['bf16'] + text_extra, r['image']['peak_gb']):.1f} GiB with bf16 weights, on a "
          f"backend with bf16 matmuls); all at once it is the sum, about "
          f"{base + xxl['fp32'] + text_extra + r['image']['peak_gb'] - base:.1f} GiB fp32. On a 24 GiB host only "
          f"the staged fp32 run fits.")


if __name__ == "__main__":
    main()
