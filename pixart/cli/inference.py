"""The flags of sample.py, which the web demo shares, and what both do with them before sampling."""
from __future__ import annotations

import argparse
import os
from typing import List

from pixart.cli import non_negative_int, positive_int, str2bool
from pixart.errors import ConfigError
from pixart.models.attention import ATTENTION_KERNELS
from pixart.runtime import DEVICES, DTYPE_NAMES, JIT_LEVELS

EXECUTION_MODES = ("graph", "streamed", "pynative")


def build_parser(description: str) -> argparse.ArgumentParser:
    from pixart.diffusion.samplers import SAMPLERS, describe_samplers

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", help="YAML file with defaults for any of the flags below")
    g = p.add_argument_group("models")
    g.add_argument("--pretrained", metavar="ID",
                   help="a diffusers pipeline already in the local Hugging Face cache, never downloaded (e.g. "
                        "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, as `huggingface-cli download` leaves it; or a "
                        "local pipeline folder): its transformer/, vae/, text_encoder/ and tokenizer/ replace the "
                        "config's model paths; the model flags below, given on the command line, win")
    g.add_argument("--checkpoint", help="transformer weights: a .ckpt made by tools/convert.py or any source it "
                                        "reads, e.g. a diffusers transformer/ or pipeline folder (converted in "
                                        "memory)")
    g.add_argument("--vae_root", help="diffusers AutoencoderKL folder (config.json + safetensors)")
    g.add_argument("--text_encoder_root", help="T5 encoder folder (config.json + safetensors shards)")
    g.add_argument("--tokenizer_root", help="T5 tokenizer folder (spiece.model / tokenizer.json)")
    g.add_argument("--input_size", type=positive_int,
                   help="latent size the checkpoint was trained at, image side / 8 (default: from the checkpoint)")
    g.add_argument("--pe_interpolation", type=float, help="position-embedding interpolation (default: from the "
                                                          "checkpoint)")
    g.add_argument("--model_max_length", type=positive_int,
                   help="T5 tokens (300 for Σ, 120 for α; default: the checkpoint's y_embedding length)")
    g.add_argument("--kv_compress_layers", type=non_negative_int, nargs="*",
                   help="layers whose keys/values are compressed (conv-compressed checkpoints carry this themselves)")
    g.add_argument("--kv_compress_sampling", choices=["conv", "ave", "uniform"],
                   help="parameter-free KV compression (ave/uniform) for checkpoints trained without it")
    g.add_argument("--kv_compress_ratio", type=positive_int, help="KV compression factor per axis (default 2)")
    g.add_argument("--lora_path", nargs="+", action="extend", default=None,
                   help="LoRA adapter(s) merged into the transformer at load: a PEFT folder (adapter_config.json + "
                        "adapter_model.safetensors, as the official PixArt LoRA script, mindone and train.py write "
                        "it) or a single pytorch_lora_weights.safetensors; repeat the flag (or list several) to "
                        "combine adapters")
    g.add_argument("--lora_scale", type=float, nargs="+", default=None,
                   help="strength of each --lora_path (one value for all, or one per adapter; default 1.0)")
    g.add_argument("--controlnet", help="a PixArt-δ ControlNet branch for --checkpoint: a .ckpt from tools/convert.py, "
                                        "the official PixArt-XL-2-1024-ControlNet.pth, or a diffusers ControlNet "
                                        "adapter (converted in memory); needs --control_image")
    g = p.add_argument_group("device and precision (see the README's 'Running on Ascend / GPU')")
    g.add_argument("--dtype", choices=DTYPE_NAMES, default="auto",
                   help="compute dtype; auto: fp16 on Ascend and GPU (what the PixArt authors ran), fp32 on CPU "
                        "(MindSpore's CPU matmuls are fp32 only)")
    g.add_argument("--attention", choices=ATTENTION_KERNELS, default="auto",
                   help="auto: MindSpore's flash_attention_score where it runs (Atlas A2/A3 NPUs in fp16/bf16), "
                        "else math; math: matmul attention in query chunks of at most 1 GiB of scores (any device); "
                        "flash: require the flash kernel")
    g.add_argument("--jit_level", choices=JIT_LEVELS, default="O0",
                   help="MindSpore compiler level: O0 kernel by kernel, O1 with operator fusion, O2 whole-graph "
                        "sinking (GE backend, Ascend only)")
    g.add_argument("--max_device_memory", default=None,
                   help="the most device memory MindSpore may take, e.g. 58GB (default: MindSpore's, the whole device)")
    g.add_argument("--mode", choices=EXECUTION_MODES, default="graph",
                   help="graph: the denoiser compiled once per shape (fastest); streamed: one compiled block "
                        "that every block's weights run through (graph speed with the memory of one block: "
                        "for the largest images on CPU, where a whole-model graph of XL/2 needs 5.5 GiB at 512px); "
                        "pynative: eager (debugging)")
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", nargs="+", help="one or more prompts")
    g.add_argument("--prompt_path", help="text file, one prompt per line (blank lines skipped); on the command "
                                         "line it replaces the config's prompt list, --prompt adds to it")
    g.add_argument("--negative_prompt", default="", help="what to steer away from (default: empty, as diffusers)")
    g = p.add_argument_group("classes (a class-conditional DiT checkpoint, instead of prompts)")
    g.add_argument("--class_labels", nargs="+", type=class_label, help="class ids, or names from --class_names (e.g. 207 360 'golden "
                                                     "retriever'); one image per label and trial")
    g.add_argument("--class_names", help="text file naming the classes, line k naming class k (ImageNet: "
                                         "configs/labels/imagenet.txt)")
    g.add_argument("--cfg_channels", type=guided_channels, default=None,
                   help="latent channels classifier-free guidance mixes: 'all' (diffusers' DiTPipeline and "
                        "PixArt pipelines) or a count; the official DiT sampler (forward_with_cfg) guides the first 3 "
                        "of 4 and keeps the conditional branch's fourth. Default: 3 for a DiT, all for PixArt")
    g = p.add_argument_group("sampling")
    g.add_argument("--image_height", type=positive_int, default=1024, help="output height in pixels")
    g.add_argument("--image_width", type=positive_int, default=1024, help="output width in pixels")
    g.add_argument("--use_resolution_binning", type=str2bool, default=True,
                   help="sample at the nearest trained aspect-ratio bucket, then resize and crop to the asked size")
    g.add_argument("--sampling_method", choices=list(SAMPLERS), default="dpm", help=describe_samplers())
    g.add_argument("--sampling_steps", type=positive_int, default=20, help="denoising steps (1..1000)")
    g.add_argument("--guidance_scale", type=float, default=4.5, help="classifier-free guidance; <= 1 turns it off")
    g.add_argument("--seed", type=non_negative_int, default=None,
                   help="base seed; image k of the run uses seed + k (default: random, printed and saved)")
    g.add_argument("--latents", help="initial latents .npy, (N, 4, h, w) for N images or one (4, h, w) for all")
    g.add_argument("--batch_size", type=positive_int, default=1, help="images per denoiser call")
    g.add_argument("--num_trials", type=positive_int, default=1, help="images per prompt")
    g.add_argument("--control_image", help="the control image every output follows (with --controlnet): an edge map, "
                                           "white edges on black, resized and cropped as the output")
    g.add_argument("--control_strength", type=float, default=1.0,
                   help="scales the control image before it is encoded (0: no control; default 1)")
    g.add_argument("--control_preprocess", choices=("none", "canny"), default="none",
                   help="canny: compute the edge map from a photo with Canny's detector. PixArt-δ's ControlNet was "
                        "trained on HED edges, whose network weights cannot be fetched here: give a ready HED map "
                        "with 'none' for the best results")
    g.add_argument("--tiled_decode", type=str2bool, default=True,
                   help="decode images larger in area than the VAE's native size (1024x1024 for SDXL) in blended "
                        "tiles, so 2K/4K images do not need the memory of the whole image at once")
    g = p.add_argument_group("output")
    g.add_argument("--output_path", default="samples", help="folder for the PNGs (never overwritten)")
    g.add_argument("--imagegrid", type=str2bool, default=False, help="also save a grid of all images")
    g.add_argument("--device", choices=DEVICES, default=None, help="MindSpore device (default: the installed backend)")
    return p


def class_label(value) -> str:
    """--class_labels item: an id or a name (YAML may give ids as numbers)."""
    text = str(value).strip()
    if not text:
        raise argparse.ArgumentTypeError("empty class label")
    return text


def guided_channels(text: str) -> int:
    """--cfg_channels: 'all' (0) or a positive count."""
    if text == "all":
        return 0
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'all' or a positive number of channels, got {text!r}") from None


def read_class_names(path: str) -> List[str]:
    """Class k's name is line k of the file."""
    if not os.path.isfile(path):
        raise ConfigError(f"--class_names: {path!r} not found")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f]


def read_class_labels(args: argparse.Namespace, num_classes: int):
    """(class ids, a caption per id) of --class_labels for a model of ``num_classes`` classes;
    a label is an id or a name of --class_names (case does not matter)."""
    if not args.class_labels:
        raise ConfigError("a class-conditional checkpoint samples classes: give --class_labels (ids or names)")
    names = read_class_names(args.class_names) if args.class_names else []
    ids = {}
    for k, name in enumerate(names):
        ids.setdefault(name.lower(), []).append(k)
    labels = []
    for label in args.class_labels:
        if label.isdigit():
            k = int(label)
            if k >= num_classes:
                raise ConfigError(f"--class_labels: {k} is not a class of this model (0 to {num_classes - 1})")
        else:
            found = ids.get(label.lower(), [])
            if len(found) != 1:
                where = f"in {args.class_names}" if names else "(no --class_names file given)"
                raise ConfigError(f"--class_labels: {label!r} " + (f"names classes {found}; give the id" if found
                                                                  else f"is not a class name {where}"))
            k = found[0]
        labels.append(k)
    captions = [f"class {k}" + (f" ({names[k]})" if k < len(names) and names[k] else "") for k in labels]
    return labels, captions


def read_prompts(args: argparse.Namespace, parser: argparse.ArgumentParser) -> List[str]:
    """--prompt, then the lines of --prompt_path. A prompt file named on the command line
    replaces the config file's example ``prompt`` list. An empty prompt is refused, as the web
    demo refuses it (``check_prompt``)."""
    from pixart.models.text_encoder import check_prompt

    prompts = list(args.prompt or [])
    file_on_command_line = args.prompt_path and args.prompt_path != parser.get_default("prompt_path")
    if file_on_command_line and args.prompt is parser.get_default("prompt"):
        prompts = []
    for i, prompt in enumerate(prompts):
        check_prompt(prompt, f"--prompt {i + 1}")
    if args.prompt_path:
        if not os.path.isfile(args.prompt_path):
            raise ConfigError(f"prompt file {args.prompt_path!r} not found")
        try:
            with open(args.prompt_path, encoding="utf-8") as f:
                from_file = [line.strip() for line in f if line.strip()]
        except UnicodeDecodeError as e:
            raise ConfigError(f"prompt file {args.prompt_path!r} is not UTF-8 text ({e.reason} at byte "
                              f"{e.start}); save it as UTF-8") from None
        if not from_file:
            raise ConfigError(f"prompt file {args.prompt_path!r} has no prompts (one per line expected)")
        prompts += from_file
    if not prompts:
        raise ConfigError("no prompt: give --prompt \"...\" or --prompt_path FILE")
    return prompts


def model_paths(args: argparse.Namespace):
    from pixart.pipelines.loading import ModelPaths

    from pixart.pipelines.loading import lora_scales

    lora_scales(len(args.lora_path or []), args.lora_scale)  # a count that does not fit is refused here, early
    return ModelPaths(args.checkpoint, args.vae_root, args.text_encoder_root, args.tokenizer_root,
                      tuple(args.lora_path or ()) + ((args.controlnet,) if args.controlnet else ()))


def load_transformer(args: argparse.Namespace, dtype, kernels):
    """The transformer of --checkpoint computing with ``kernels`` (``Kernels.for_device``), the
    architecture flags applied and the --lora_path adapters merged in; (model, LoraMerger or None)."""
    from pixart.models.family import holds_dit
    from pixart.models.pixart_checkpoint import load_pixart
    from pixart.pipelines.loading import merge_loras

    if holds_dit(args.checkpoint):
        from pixart.models.dit_checkpoint import load_dit

        if args.lora_path or args.controlnet:
            raise ConfigError("--lora_path and --controlnet adapt PixArt checkpoints, not a DiT")
        return load_dit(args.checkpoint, dtype=dtype, kernels=kernels, input_size=args.input_size)[0], None
    model, _ = load_pixart(args.checkpoint, dtype=dtype, kernels=kernels, input_size=args.input_size,
                           pe_interpolation=args.pe_interpolation, kv_compress_layers=args.kv_compress_layers,
                           kv_compress_sampling=args.kv_compress_sampling, kv_compress_ratio=args.kv_compress_ratio)
    merger = merge_loras(model, args.lora_path or [], args.lora_scale)
    if args.controlnet:
        from pixart.models.controlnet import load_control_pixart, read_controlnet
        model = load_control_pixart(model, read_controlnet(args.controlnet), args.controlnet)
    return model, merger


def read_control_image(args: argparse.Namespace):
    """The --control_image as (H, W, 3) uint8, made an edge map when asked; None without a ControlNet."""
    if bool(args.controlnet) != bool(args.control_image):
        raise ConfigError("--controlnet and --control_image go together: the ControlNet needs a control image, "
                          "and a control image needs a ControlNet")
    if not args.controlnet:
        return None
    if not os.path.isfile(args.control_image):
        raise ConfigError(f"--control_image: {args.control_image!r} not found")
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(args.control_image) as im:
            image = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(f"--control_image: {args.control_image!r} is not a readable image ({e})") from None
    if args.control_preprocess == "canny":
        from pixart.utils.edges import canny
        image = canny(image)
    return image


def lora_label(args: argparse.Namespace, scales=None) -> str:
    """'name@scale, ...' of the merged adapters, for the PNG metadata (empty without adapters)."""
    from pixart.pipelines.loading import lora_scales

    paths = args.lora_path or []
    scales = scales if scales is not None else lora_scales(len(paths), args.lora_scale)
    return ", ".join(f"{os.path.basename(os.path.normpath(p))}@{s:g}" for p, s in zip(paths, scales))
