#!/usr/bin/env python
"""Text-to-image with PixArt-Σ / PixArt-α (and class-to-image with DiT) on MindSpore.

    python sample.py -c configs/inference/pixart-sigma-512-MS.yaml --prompt "a small cactus with a happy face"
    python sample.py -c configs/inference/pixart-sigma-1024-MS.yaml --prompt "..." --image_width 1024 --image_height 512
    python sample.py -c configs/inference/pixart-sigma-1024-MS.yaml --prompt_path prompts.txt --batch_size 4
    python sample.py -c configs/inference/dit-xl-2-256.yaml --class_labels 207 360 "lesser panda" 974
    python sample.py -c configs/inference/pixart-sigma-1024-MS.yaml --prompt "..." \\
        --pretrained PixArt-alpha/PixArt-Sigma-XL-2-1024-MS   # as `huggingface-cli download` left it in the cache

Every flag can also be set in the YAML config (same name, no dashes); the command line wins.
Stages run one after another so peak memory is the largest stage, not the sum: the T5
encoder encodes every prompt and is released before the transformer and VAE are loaded.
"""
import os
import sys
import time

import numpy as np

from pixart.cli import entry_point, parse_with_config
from pixart.cli.inference import (build_parser, load_transformer, lora_label, model_paths,
                                  read_class_labels, read_control_image, read_prompts)
from pixart.errors import ConfigError
from pixart.utils.hf_cache import apply_pretrained


def load_latents(path: str, n: int) -> np.ndarray:
    """(n, C, h, w) float32 from a .npy of one (C, h, w) latent or n of them; finite numbers only."""
    if not os.path.isfile(path):
        raise ConfigError(f"--latents: {path!r} not found")
    try:
        latents = np.load(path, allow_pickle=False)  # a pickled object array could run code
    except (ValueError, OSError, EOFError) as e:
        raise ConfigError(f"--latents: {path!r} is not a NumPy .npy array of numbers ({e})") from None
    if not isinstance(latents, np.ndarray) or latents.dtype.kind not in "fiu":
        raise ConfigError(f"--latents: {path!r} holds {getattr(latents, 'dtype', type(latents).__name__)}, "
                          f"expected a float array")
    latents = latents.astype(np.float32)
    if latents.ndim == 3:
        latents = latents[None]
    if latents.ndim != 4 or latents.shape[0] not in (1, n):
        raise ConfigError(f"--latents: expected (N, C, h, w) with N = 1 or {n} images, got {latents.shape}")
    if not np.isfinite(latents).all():
        raise ConfigError(f"--latents: {path!r} contains NaN or infinite values")
    return np.broadcast_to(latents, (n,) + latents.shape[1:]).copy()


def encode_text(args, prompts, max_length, device, dtype):
    """Stage 1: T5 embeddings of every prompt and of the negative prompt; the encoder is released after."""
    from pixart.models.text_encoder import encode_prompts_staged, load_tokenizer, normalize_prompt
    from pixart.pipelines.text_to_image import TextEmbeddings
    from pixart.runtime import text_encoder_dtype

    tokenizer = load_tokenizer(args.tokenizer_root)
    print(f"encoding {len(prompts)} prompt(s) with T5 ({max_length} tokens) ...")
    texts = [normalize_prompt(p) for p in prompts + [args.negative_prompt]]
    emb, mask = encode_prompts_staged(texts, args.text_encoder_root, tokenizer, max_length,
                                      dtype=text_encoder_dtype(device, dtype))
    return TextEmbeddings(emb[:-1], mask[:-1]), TextEmbeddings(emb[-1:], mask[-1:])


def class_rows(args, checkpoint: str):
    """A DiT's stage 1: class ids instead of text. (rows, the null class, a caption per row)."""
    from pixart.models.family import read_model_config
    from pixart.pipelines.text_to_image import ClassLabels

    num_classes = read_model_config(checkpoint).num_classes
    labels, captions = read_class_labels(args, num_classes)
    return ClassLabels(np.array(labels, np.int32)), ClassLabels.null(num_classes), captions


def load_pipeline(args, dtype, kernels, class_conditional: bool):
    """Stage 2: the transformer and the VAE, as a pipeline; the output size is checked before any compute."""
    from pixart.models.autoencoder_kl import AutoencoderKL
    from pixart.pipelines.text_to_image import PixArtPipeline

    transformer, _ = load_transformer(args, dtype, kernels)
    vae = AutoencoderKL.from_pretrained(args.vae_root, dtype=dtype)
    channels = args.cfg_channels if args.cfg_channels is not None else (3 if class_conditional else 0)
    pipeline = PixArtPipeline(transformer, vae, mode=args.mode, tiled_decode=args.tiled_decode,
                              guided_channels=channels or None)
    pipeline.generation_size(args.image_height, args.image_width, args.use_resolution_binning)
    return pipeline


def generate(args, pipeline, text, negative, jobs, seeds, latents, control_image):
    """Every (prompt, trial) job in batches; yields (prompt, seed, image, generated size, s/step)."""
    from pixart.pipelines.text_to_image import split_batches

    row_of = {}
    for prompt, _ in jobs:
        row_of.setdefault(prompt, len(row_of))
    for part in split_batches(len(jobs), args.batch_size):
        rows = [row_of[p] for p, _ in jobs[part]]
        result = pipeline(text.take(rows), negative.take([0] * len(rows)), args.image_height, args.image_width,
                          sampling_method=args.sampling_method, sampling_steps=args.sampling_steps,
                          guidance_scale=args.guidance_scale, seeds=seeds[part],
                          latents=None if latents is None else latents[part],
                          use_resolution_binning=args.use_resolution_binning, control_image=control_image,
                          control_strength=args.control_strength)
        for (prompt, _), seed, image in zip(jobs[part], seeds[part], result.images):
            yield prompt, seed, image, result.generated_size, result.seconds_per_step


@entry_point
def main(argv=None) -> int:
    parser = build_parser(__doc__)
    args = parse_with_config(parser, argv)
    apply_pretrained(args, argv)
    paths = model_paths(args)
    paths.check()
    class_conditional = paths.class_conditional
    prompts = None if class_conditional else read_prompts(args, parser)
    control_image = read_control_image(args)

    from pixart.pipelines.loading import check_parts_fit
    from pixart.models.pixart import Kernels
    from pixart.runtime import compute_dtype, setup_device
    from pixart.utils.files import check_writable_folder
    from pixart.utils.images import generation_metadata, make_grid, save_png, slug
    from pixart.utils.seeds import image_seeds

    check_writable_folder(args.output_path)  # before hours of compute, not after

    device = setup_device(args.device, args.jit_level, args.max_device_memory)
    dtype = compute_dtype(args.dtype, device)
    kernels = Kernels.for_device(device, dtype, args.attention)
    if class_conditional:
        text, negative, prompts = class_rows(args, args.checkpoint)
    jobs = [(p, k) for p in prompts for k in range(args.num_trials)]
    seeds = image_seeds(len(jobs), args.seed)
    latents = load_latents(args.latents, len(jobs)) if args.latents else None
    max_length, size_limits = check_parts_fit(paths, args.model_max_length, args.input_size)
    size_limits.check(args.image_height, args.image_width)
    start = time.perf_counter()
    if not class_conditional:
        text, negative = encode_text(args, prompts, max_length, device, dtype)
    pipeline = load_pipeline(args, dtype, kernels, class_conditional)
    load_s = time.perf_counter() - start

    images, per_step, gen_size = [], [], None
    for prompt, seed, image, gen_size, seconds_per_step in generate(args, pipeline, text, negative, jobs, seeds,
                                                                      latents, control_image):
        meta = generation_metadata(prompt, args.negative_prompt, seed, args.sampling_method, args.sampling_steps,
                                   args.guidance_scale, args.checkpoint, (args.image_height, args.image_width),
                                   gen_size, lora_label(args))
        if control_image is not None:
            meta.update(controlnet=os.path.basename(args.controlnet), control_image=os.path.basename(args.control_image),
                        control_strength=str(args.control_strength))
        path = save_png(image, args.output_path, slug(prompt), meta)
        images.append(image)
        per_step.append(seconds_per_step)
        print(f"saved {path}  (seed {seed})")
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
