#!/usr/bin/env python
"""Web demo: PixArt-Σ / PixArt-α text-to-image in the browser (gradio), on MindSpore.

    python gradio_demo.py            # the bundled digits model, open http://localhost:7788
    python gradio_demo.py --checkpoint models/PixArt-Sigma-XL-2-1024-MS.ckpt --vae_root models/vae \\
        --text_encoder_root models/text_encoder --tokenizer_root models/tokenizer --image_height 1024 --image_width 1024
    python gradio_demo.py -c configs/inference/pixart-sigma-512-MS.yaml

The flags and configs are sample.py's: a config made for sample.py works here as it is. With none of
-c, --checkpoint and --pretrained, configs/inference/pixart-digits.yaml is used. Models are loaded once at start;
the T5 text encoder stays loaded because every request encodes its prompt (T5-v1.1-XXL: about 19 GB
in fp32, 9.5 GB in fp16/bf16, on top of the transformer and VAE). Requests wait in a queue and run one
at a time. Every image is saved with its settings in the PNG metadata to --output_path, never
overwriting. sample.py flags that make no sense in a page (--prompt_path, --latents, --batch_size,
--imagegrid, --num_trials) are accepted, so configs load, but are ignored; --prompt, --negative_prompt,
--seed, --image_height/--image_width, --sampling_* and --guidance_scale fill the form.
"""
import argparse
import os
import sys

from pixart.cli import entry_point, fail, parse_with_config, positive_int, str2bool
from pixart.cli.inference import build_parser as build_inference_parser
from pixart.cli.inference import load_transformer, model_paths
from pixart.utils.hf_cache import apply_pretrained

DEFAULT_CONFIG = "configs/inference/pixart-digits.yaml"
IGNORED_FLAGS = ("prompt_path", "latents", "batch_size", "imagegrid", "num_trials")
FORM_FLAGS = ("prompt", "negative_prompt", "image_height", "image_width", "sampling_method", "sampling_steps",
              "guidance_scale", "seed")


def build_parser():
    p = build_inference_parser(__doc__)
    p.prog = "gradio_demo.py"
    for action in p._actions:
        if action.dest in IGNORED_FLAGS:  # parseable, since configs set them, but out of -h
            action.help = argparse.SUPPRESS
        elif action.dest in FORM_FLAGS:
            action.help += "; here: the form's initial value"
    g = p.add_argument_group("web demo")
    g.add_argument("--port", type=positive_int, default=7788, help="port to serve the page on (default %(default)s)")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default %(default)s: this machine only; 0.0.0.0: the network)")
    g.add_argument("--share", type=str2bool, nargs="?", const=True, default=False,
                   help="also publish a temporary public gradio.live link (needs internet access; default off)")
    g.add_argument("--max_images", type=positive_int, default=4,
                   help="most images one request may ask for (default %(default)s)")
    g.add_argument("--queue_size", type=positive_int, default=32,
                   help="most requests waiting at once (default %(default)s); more are refused until the queue drains")
    return p


def parse_args(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    given = {a.split("=")[0] for a in argv}
    if not given & {"-c", "--config", "--checkpoint", "--pretrained", "-h", "--help"}:
        # nothing says which model: serve the bundled one (a plain `python gradio_demo.py` must just work)
        if not os.path.isfile(DEFAULT_CONFIG):
            fail(f"no model given and the bundled {DEFAULT_CONFIG} is missing; pass -c CONFIG or --checkpoint "
                 f"and the model folders (see -h)")
        argv = ["-c", DEFAULT_CONFIG] + argv
    args = parse_with_config(build_parser(), argv)
    apply_pretrained(args, argv)
    return args


def load_generator(args):
    """Load tokenizer, T5, transformer and VAE once."""
    from demo.generator import DemoGenerator, MergedLoras
    from pixart.models.autoencoder_kl import AutoencoderKL
    from pixart.models.text_encoder import load_tokenizer
    from pixart.pipelines.loading import check_parts_fit, load_text_encoder
    from pixart.pipelines.text_to_image import PixArtPipeline
    from pixart.models.pixart import Kernels
    from pixart.runtime import compute_dtype, setup_device

    paths = model_paths(args)
    paths.check()
    max_length, _ = check_parts_fit(paths, args.model_max_length, args.input_size)
    device = setup_device(args.device, args.jit_level, args.max_device_memory)
    dtype = compute_dtype(args.dtype, device)
    kernels = Kernels.for_device(device, dtype, args.attention)
    print("loading the models ...")
    transformer, merger = load_transformer(args, dtype, kernels)
    vae = AutoencoderKL.from_pretrained(args.vae_root, dtype=dtype)
    tokenizer = load_tokenizer(args.tokenizer_root)
    text_encoder = load_text_encoder(args.text_encoder_root, device, dtype)
    pipeline = PixArtPipeline(transformer, vae, mode=args.mode, tiled_decode=args.tiled_decode)
    loras = None
    if merger:
        from pixart.pipelines.loading import lora_scales
        names = [os.path.basename(os.path.normpath(p)) for p in args.lora_path]
        loras = MergedLoras(merger, names, lora_scales(len(names), args.lora_scale))
    return DemoGenerator(tokenizer, text_encoder, max_length, pipeline, args.output_path,
                         os.path.basename(args.checkpoint), args.use_resolution_binning, args.max_images, loras)


def whole(value):
    """Sliders and number boxes send floats; the generator wants whole numbers and says so otherwise."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def form_fields(gr, generator, args):
    """The input widgets, initialised from the flags, keyed by what they set."""
    from demo.generator import MAX_GUIDANCE, MAX_LORA_STRENGTH, MAX_SEED, MAX_STEPS
    from pixart.diffusion.samplers import SAMPLERS

    limits = generator.size_limits

    def clamp_side(value):
        value = int(round(value / limits.step) * limits.step)
        return min(max(value, limits.minimum), limits.maximum)

    f = {}
    f["prompt"] = gr.Textbox(label="Prompt", lines=2, value=(args.prompt or [""])[0], elem_id="prompt",
                             placeholder="what to draw")
    f["negative"] = gr.Textbox(label="Negative prompt", value=args.negative_prompt, elem_id="negative_prompt",
                               placeholder="what to steer away from (optional)")
    with gr.Row():
        f["sampler"] = gr.Radio(list(SAMPLERS), value=args.sampling_method, label="Sampler", elem_id="sampler",
                                info="; ".join(f"{name}: {cls.description}" for name, cls in SAMPLERS.items()))
        f["steps"] = gr.Slider(1, MAX_STEPS, value=min(args.sampling_steps, MAX_STEPS), step=1, label="Steps",
                               elem_id="steps")
    f["guidance"] = gr.Slider(0, MAX_GUIDANCE, value=args.guidance_scale, step=0.1, label="Guidance scale",
                              info="classifier-free guidance; 1 or less turns it off", elem_id="guidance")
    with gr.Row():
        f["seed"] = gr.Number(value=args.seed if args.seed is not None else 0, precision=0, minimum=0,
                              maximum=MAX_SEED, label="Seed", elem_id="seed")
        f["randomize"] = gr.Checkbox(value=args.seed is None, label="Randomize seed", elem_id="randomize")
    f["aspect"] = gr.Dropdown(["custom"] + list(generator.aspect_ratios()), value="custom", label="Aspect ratio",
                              info="the model's trained sizes; sets width and height", elem_id="aspect")
    with gr.Row():
        f["width"] = gr.Slider(limits.minimum, limits.maximum, value=clamp_side(args.image_width),
                               step=limits.step, label="Width", elem_id="width")
        f["height"] = gr.Slider(limits.minimum, limits.maximum, value=clamp_side(args.image_height),
                                step=limits.step, label="Height", elem_id="height")
    f["num_images"] = gr.Slider(1, generator.max_images, value=1, step=1, label="Number of images",
                                elem_id="num_images")
    if hasattr(generator.pipeline.transformer, "controlnet"):  # a ControlNet model: its control image
        with gr.Row():
            f["control_image"] = gr.Image(value=args.control_image, type="numpy", label="Control image (edge map, "
                                          "white on black)",
                                          image_mode="RGB", elem_id="control_image")
            with gr.Column():
                f["control_preprocess"] = gr.Radio(["none", "canny"], value=args.control_preprocess,
                                                   label="Preprocess", elem_id="control_preprocess",
                                                   info="canny: edges from a photo (the model was trained on HED "
                                                        "edges: a ready edge map works best)")
                f["control_strength"] = gr.Slider(0, 2, value=args.control_strength, step=0.05,
                                                  label="Control strength", elem_id="control_strength")
    else:
        f["control_image"], f["control_preprocess"], f["control_strength"] = (gr.State(None), gr.State("none"),
                                                                              gr.State(1.0))
    if generator.loras:  # merged into the weights; a new strength re-merges them once, exactly
        f["lora"] = gr.Slider(0, MAX_LORA_STRENGTH, value=1.0, step=0.05, label="LoRA strength", elem_id="lora",
                              info=f"times the --lora_scale of {', '.join(generator.loras.names)}; 0: the base model")
    else:
        f["lora"] = gr.State(1.0)
    return f


def result_fields(gr, generator):
    """The output widgets: gallery, seed used, info line (and the edge map followed, for a ControlNet)."""
    gallery = gr.Gallery(label="Images", columns=2, height=600, object_fit="contain", elem_id="gallery")
    seed_used = gr.Number(label="Seed used (image k used seed + k)", precision=0, interactive=False,
                          elem_id="seed_used")
    info = gr.Textbox(label="Info", interactive=False, elem_id="info")
    controlled = hasattr(generator.pipeline.transformer, "controlnet")
    edges = gr.Image(label="Edge map followed", interactive=False, elem_id="edges", visible=controlled)
    return [gallery, seed_used, info, edges]


def build_page(generator, args):
    import gradio as gr

    from demo.generator import MAX_STEPS, Request
    from pixart.diffusion.samplers import SAMPLERS
    from pixart.errors import RequestError

    ratios = generator.aspect_ratios()

    def generate(prompt, negative_prompt, sampler, steps, guidance, seed, randomize, width, height, num_images,
                 lora_strength, control_image, control_preprocess, control_strength, progress=gr.Progress()):
        request = Request(prompt=prompt, negative_prompt=negative_prompt or "", sampling_method=sampler,
                          sampling_steps=whole(steps), guidance_scale=guidance,
                          seed=None if randomize else whole(seed), height=whole(height), width=whole(width),
                          num_images=whole(num_images), lora_strength=lora_strength, control_image=control_image,
                          control_preprocess=control_preprocess, control_strength=control_strength)
        try:
            result = generator.generate(request, on_progress=lambda fraction, what: progress(fraction, desc=what))
        except RequestError as e:
            raise gr.Error(str(e), print_exception=False) from None
        return result.paths, result.seed, result.info, result.control

    def pick_ratio(choice):
        if choice not in ratios:  # "custom": leave the sliders alone
            return gr.update(), gr.update()
        h, w = ratios[choice]
        return gr.update(value=w), gr.update(value=h)

    # delete_cache: gradio serves each result from a copy in its cache; drop copies older than a day, hourly,
    # so a long-running demo does not fill the disk (the originals stay in --output_path)
    with gr.Blocks(title="PixArt-Σ on MindSpore", analytics_enabled=False, delete_cache=(3600, 86400)) as page:
        gr.Markdown(f"## PixArt-Σ on MindSpore\nModel `{args.checkpoint}`, trained at "
                    f"{generator.base_size}x{generator.base_size}. Images are saved with their settings to "
                    f"`{os.path.abspath(args.output_path)}`.")
        with gr.Row():
            with gr.Column():
                f = form_fields(gr, generator, args)
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                outputs = result_fields(gr, generator)
        f["aspect"].change(pick_ratio, f["aspect"], [f["width"], f["height"]], queue=False)
        # choosing a sampler sets its usual step count (LCM: 4, IDDPM: 100); the slider stays free
        f["sampler"].input(lambda name: gr.update(value=min(SAMPLERS[name].default_steps, MAX_STEPS)), f["sampler"],
                           f["steps"], queue=False)
        inputs = [f[k] for k in ("prompt", "negative", "sampler", "steps", "guidance", "seed", "randomize", "width",
                                 "height", "num_images", "lora", "control_image", "control_preprocess",
                                 "control_strength")]
        gr.on([button.click, f["prompt"].submit], generate, inputs, outputs)
    # one request at a time: there is a single copy of the models; the others wait their turn in the queue
    page.queue(default_concurrency_limit=1, max_size=args.queue_size)
    return page


def page_css(generator) -> str:
    # images of small models (the 32 px digits) are shown many times enlarged: keep their pixels sharp
    return "#gallery img { image-rendering: pixelated; }" if generator.base_size < 256 else ""


@entry_point
def main(argv=None) -> int:
    # no telemetry and no version check: the demo must start the same with or without internet
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = parse_args(argv)
    from pixart.utils.files import check_writable_folder

    check_writable_folder(args.output_path)  # before the models load, not at the first request
    generator = load_generator(args)
    page = build_page(generator, args)
    try:
        page.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True,
                    allowed_paths=[os.path.abspath(args.output_path)], ssr_mode=False, css=page_css(generator))
    except OSError as e:  # the port is taken or the address is not this machine's
        fail(f"cannot serve on {args.host}:{args.port}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
