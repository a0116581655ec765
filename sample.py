#!/usr/bin/env python
"""Text-to-image with PixArt-Σ / PixArt-α on MindSpore.

    python sample.py -c configs/inference/pixart-sigma-512-MS.yaml --prompt "a small cactus with a happy face"
    python sample.py -c configs/inference/pixart-sigma-1024-MS.yaml --prompt "..." --image_width 1024 --image_height 512
    python sample.py -c configs/inference/pixart-sigma-1024-MS.yaml --prompt_path prompts.txt --batch_size 4

Every flag can also be set in the YAML config (same name, no dashes); the command line wins.
Stages run one after another so peak memory is the largest stage, not the sum: the T5
encoder encodes every prompt and is released before the transformer and VAE are loaded.
"""
import argparse
import os
import sys
import time

import numpy as np

from pixart.utils.config import parse_with_config, str2bool

DTYPES = ("fp32", "fp16", "bf16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", help="YAML file with defaults for any of the flags below")
    g = p.add_argument_group("models")
    g.add_argument("--checkpoint", help="transformer weights: a .ckpt made by tools/convert.py (or any source it reads)")
    g.add_argument("--vae_root", help="diffusers AutoencoderKL folder (config.json + safetensors)")
    g.add_argument("--text_encoder_root", help="T5 encoder folder (config.json + safetensors shards)")
    g.add_argument("--tokenizer_root", help="T5 tokenizer folder (spiece.model / tokenizer.json)")
    g.add_argument("--sample_size", type=int, help="latent size the checkpoint was trained at (default: from the "
                                                    "checkpoint)")
    g.add_argument("--pe_interpolation", type=float, help="position-embedding interpolation (default: from the "
                                                          "checkpoint)")
    g.add_argument("--model_max_length", type=int,
                   help="T5 tokens (300 for Σ, 120 for α; default: the checkpoint's y_embedding length)")
    g.add_argument("--kv_compress_layers", type=int, nargs="*",
                   help="layers whose keys/values are compressed (conv-compressed checkpoints carry this themselves)")
    g.add_argument("--kv_compress_sampling", choices=["conv", "ave", "uniform"],
                   help="parameter-free KV compression (ave/uniform) for checkpoints trained without it")
    g.add_argument("--kv_compress_ratio", type=int, help="KV compression factor per axis (default 2)")
    g.add_argument("--dtype", choices=DTYPES, default="fp32", help="compute dtype (CPU: fp32 only)")
    g.add_argument("--mode", choices=["graph", "streamed", "pynative"], default="graph",
                   help="graph: the denoiser compiled once per shape (fastest); streamed: one compiled block "
                        "that every block's weights run through (graph speed with the memory of one block: "
                        "use it for XL at 512px and above on CPU, where a whole-model graph keeps ~1 GB per "
                        "block); pynative: eager (debugging)")
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", nargs="+", help="one or more prompts")
    g.add_argument("--prompt_path", help="text file, one prompt per line (blank lines skipped); on the command "
                                         "line it replaces the config's prompt list, --prompt adds to it")
    g.add_argument("--negative_prompt", default="", help="what to steer away from (default: empty, as diffusers)")
    g = p.add_argument_group("sampling")
    g.add_argument("--image_height", type=int, default=1024, help="output height in pixels")
    g.add_argument("--image_width", type=int, default=1024, help="output width in pixels")
    g.add_argument("--use_resolution_binning", type=str2bool, default=True,
                   help="sample at the nearest trained aspect-ratio bucket, then resize and crop to the asked size")
    g.add_argument("--sampling_method", choices=["dpm", "ddim", "iddpm"], default="dpm",
                   help="dpm: DPM-Solver++ (2M, as shipped with PixArt-Σ); ddim: eta 0; iddpm: ancestral, learned sigma")
    g.add_argument("--sampling_steps", type=int, default=20, help="denoising steps (1..1000)")
    g.add_argument("--guidance_scale", type=float, default=4.5, help="classifier-free guidance; <= 1 turns it off")
    g.add_argument("--seed", type=int, default=None,
                   help="base seed; image k of the run uses seed + k (default: random, printed and saved)")
    g.add_argument("--latents", help="initial latents .npy, (N, 4, h, w) for N images or one (4, h, w) for all")
    g.add_argument("--batch_size", type=int, default=1, help="images per denoiser call")
    g.add_argument("--num_trials", type=int, default=1, help="images per prompt")
    g.add_argument("--tiled_decode", type=str2bool, default=True,
                   help="decode images larger in area than the VAE's native size (1024x1024 for SDXL) in blended "
                        "tiles, so 2K/4K images do not need the memory of the whole image at once")
    g = p.add_argument_group("output")
    g.add_argument("--output_path", default="samples", help="folder for the PNGs (never overwritten)")
    g.add_argument("--imagegrid", type=str2bool, default=False, help="also save a grid of all images")
    g.add_argument("--device", choices=["CPU", "GPU", "Ascend"], default=None,
                   help="MindSpore device (default: the installed backend)")
    return p


def read_prompts(args, parser) -> list:
    """--prompt, then the lines of --prompt_path. A prompt file named on the command line
    replaces the config file's example ``prompt`` list."""
    from pixart.utils.config import fail

    prompts = list(args.prompt or [])
    file_on_command_line = args.prompt_path and args.prompt_path != parser.get_default("prompt_path")
    if file_on_command_line and args.prompt is parser.get_default("prompt"):
        prompts = []
    if args.prompt_path:
        if not os.path.isfile(args.prompt_path):
            fail(f"prompt file {args.prompt_path!r} not found")
        with open(args.prompt_path, encoding="utf-8") as f:
            from_file = [line.strip() for line in f if line.strip()]
        if not from_file:
            fail(f"prompt file {args.prompt_path!r} has no prompts (one per line expected)")
        prompts += from_file
    if not prompts:
        fail("no prompt: give --prompt \"...\" or --prompt_path FILE")
    return prompts


MISSING_HELP = {
    "checkpoint": "Download the transformer .pth of your model (e.g. PixArt-Sigma-XL-2-1024-MS.pth from the "
                  "PixArt-alpha/PixArt-Sigma repository on Hugging Face) into models/ and convert it:\n"
                  "  python tools/convert.py --source models/PixArt-Sigma-XL-2-1024-MS.pth "
                  "--target models/PixArt-Sigma-XL-2-1024-MS.ckpt",
    "vae_root": "Download the vae/ folder of PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers (SDXL VAE; for "
                "PixArt-α the SD VAE, sd-vae-ft-ema) to models/vae.",
    "text_encoder_root": "Download the text_encoder/ folder of PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers "
                         "(T5-v1.1-XXL encoder) to models/text_encoder.",
    "tokenizer_root": "Download the tokenizer/ folder of PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers "
                      "to models/tokenizer.",
}


def check_paths(args):
    from pixart.utils.config import fail

    for key, help_text in MISSING_HELP.items():
        path = getattr(args, key)
        if not path:
            fail(f"--{key} is not set (nor in the config).\n{help_text}")
        if not os.path.exists(path):
            fail(f"--{key}: {path!r} does not exist.\n{help_text}")


def load_latents(path: str, n: int):
    from pixart.utils.config import fail

    if not os.path.isfile(path):
        fail(f"--latents: {path!r} not found")
    latents = np.load(path).astype(np.float32)
    if latents.ndim == 3:
        latents = latents[None]
    if latents.ndim != 4 or latents.shape[0] not in (1, n):
        fail(f"--latents: expected (N, C, h, w) with N = 1 or {n} images, got {latents.shape}")
    return np.broadcast_to(latents, (n,) + latents.shape[1:]).copy()


def setup_device(args):
    """Select the MindSpore device; return (device target, compute dtype). Exits on a dtype the device lacks."""
    import mindspore as ms
    from pixart.utils.config import fail

    if args.device:
        ms.set_device(args.device)
    ms.set_context(mode=ms.PYNATIVE_MODE)  # the denoiser compiles itself with ms.jit in graph mode
    device = ms.get_context("device_target")
    if device == "CPU" and args.dtype != "fp32":
        fail(f"--dtype {args.dtype} is not supported on CPU (MindSpore's CPU matmuls are fp32); use --dtype fp32")
    return device, {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}[args.dtype]


def load_transformer(args, dtype):
    """The PixArt transformer of --checkpoint with the architecture flags applied; (model, config).
    Raises ModelLoadError."""
    from pixart.models.pixart_checkpoint import load_pixart

    return load_pixart(args.checkpoint, dtype=dtype, input_size=args.sample_size,
                       pe_interpolation=args.pe_interpolation, kv_compress_layers=args.kv_compress_layers,
                       kv_compress_sampling=args.kv_compress_sampling, kv_compress_ratio=args.kv_compress_ratio)


def main(argv=None) -> int:
    parser = build_parser()
    args = parse_with_config(parser, argv)
    from pixart.utils.config import fail

    prompts = read_prompts(args, parser)
    check_paths(args)
    if args.batch_size < 1 or args.num_trials < 1:
        fail("--batch_size and --num_trials must be at least 1")
    if not 1 <= args.sampling_steps <= 1000:
        fail(f"--sampling_steps must be in 1..1000, got {args.sampling_steps}")

    import mindspore as ms
    from pixart.models.autoencoder_kl import AutoencoderKL
    from pixart.models.pixart_checkpoint import read_config
    from pixart.models.text_encoder import encode_prompts_staged, load_tokenizer, normalize_prompt
    from pixart.pipelines.text_to_image import PixArtPipeline, TextEmbeddings, split_batches
    from pixart.utils.errors import ModelLoadError
    from pixart.utils.images import make_grid, save_png, slug

    device, dtype = setup_device(args)

    jobs = [(p, k) for p in prompts for k in range(args.num_trials)]
    base_seed = args.seed if args.seed is not None else int(np.random.SeedSequence().generate_state(1)[0] % 2**31)
    seeds = [base_seed + i for i in range(len(jobs))]
    latents = load_latents(args.latents, len(jobs)) if args.latents else None
    start = time.perf_counter()
    try:
        # stage 1: text. Only the transformer knows the token length, so read its config first.
        max_length = args.model_max_length or read_config(args.checkpoint).model_max_length
        tokenizer = load_tokenizer(args.tokenizer_root)
        print(f"encoding {len(prompts)} prompt(s) with T5 ({max_length} tokens) ...")
        t_dtype = ms.float32 if device == "CPU" else dtype
        texts = [normalize_prompt(p) for p in prompts + [args.negative_prompt]]
        emb, mask = encode_prompts_staged(texts, args.text_encoder_root, tokenizer, max_length, dtype=t_dtype)
        text = TextEmbeddings(emb[:-1], mask[:-1])
        negative = TextEmbeddings(emb[-1:], mask[-1:])
        # stage 2: transformer + VAE
        transformer, config = load_transformer(args, dtype)
        if config.model_max_length != max_length:
            fail(f"--model_max_length {max_length} does not match the checkpoint's {config.model_max_length} tokens")
        vae = AutoencoderKL.from_pretrained(args.vae_root, dtype=dtype)
    except ModelLoadError as e:
        fail(str(e))
    load_s = time.perf_counter() - start
    pipeline = PixArtPipeline(transformer, vae, mode=args.mode, tiled_decode=args.tiled_decode)
    try:
        pipeline.generation_size(args.image_height, args.image_width, args.use_resolution_binning)
    except ValueError as e:
        fail(str(e))

    index_of = {p: i for i, p in enumerate(prompts)}
    saved, images, per_step, gen_size = [], [], [], None
    for part in split_batches(len(jobs), args.batch_size):
        rows = [index_of[p] for p, _ in jobs[part]]
        cond = text.take(rows)
        try:
            result = pipeline(cond, negative.take([0] * len(rows)), args.image_height, args.image_width,
                              sampling_method=args.sampling_method, steps=args.sampling_steps,
                              guidance_scale=args.guidance_scale, seeds=seeds[part],
                              latents=None if latents is None else latents[part],
                              use_resolution_binning=args.use_resolution_binning)
        except ValueError as e:
            fail(str(e))
        per_step.append(result.seconds_per_step)
        gen_size = result.generated_size
        for (prompt, _), seed, image in zip(jobs[part], seeds[part], result.images):
            meta = {"prompt": prompt, "negative_prompt": args.negative_prompt, "seed": seed,
                    "sampler": args.sampling_method, "steps": args.sampling_steps, "guidance_scale": args.guidance_scale,
                    "checkpoint": os.path.basename(args.checkpoint), "size": f"{args.image_height}x{args.image_width}",
                    "generated_size": f"{gen_size[0]}x{gen_size[1]}"}
            saved.append(save_png(image, args.output_path, slug(prompt), meta))
            images.append(image)
            print(f"saved {saved[-1]}  (seed {seed})")
    if args.imagegrid and len(images) > 1:
        grid = save_png(make_grid(images), args.output_path, "grid", {"prompts": " | ".join(prompts)})
        print(f"saved grid {grid}")
    total = time.perf_counter() - start
    print(f"{len(images)} image(s) at {args.image_height}x{args.image_width} (sampled at {gen_size[0]}x{gen_size[1]}), "
          f"{args.sampling_method} {args.sampling_steps} steps: {np.mean(per_step):.3f} s/step, loading {load_s:.1f} s, "
          f"total {total:.1f} s -> {os.path.abspath(args.output_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
