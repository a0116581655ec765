#!/usr/bin/env python
"""Images per second of the digits model: the 20-step guided teacher against its LCM-LoRA.

Both through the same pipeline and VAE, the same 20 prompts as one batch, graph mode: the
teacher with DPM-Solver++ at 20 steps and guidance 4.5 (two transformer rows per image), the
LCM-LoRA (merged into the weights at load) with ``--lcm_steps`` LCM steps and no guidance.
Median of ``--repeats`` runs after two warm-up runs (the first compiles the transformer, the
second the VAE decoder, which compiles once a shape repeats); teacher and LCM runs alternate. Also reported: the denoising alone
(steps x the steady time per step), without the VAE decode (prompts are encoded beforehand).

    python -m benchmarks.bench_lcm_digits                                   # models/digits-lcm-lora, 4 steps
    python -m benchmarks.bench_lcm_digits --lora_path output/.../adapter --lcm_steps 2
"""
import argparse
import os
import statistics
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed_run(pipeline, text, null, method, steps, guidance):
    """(seconds for the batch end to end, seconds of denoising: steps x the steady time per step)."""
    start = time.perf_counter()
    result = pipeline(text, null.take([0] * len(text)), 32, 32, sampling_method=method, sampling_steps=steps,
                      guidance_scale=guidance, seeds=list(range(len(text))), use_resolution_binning=False,
                      progress=False)
    return time.perf_counter() - start, steps * result.seconds_per_step


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora_path", default=os.path.join(ROOT, "models", "digits-lcm-lora"))
    p.add_argument("--lcm_steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    from benchmarks.machine import cpu_description
    from pixart.models.autoencoder_kl import AutoencoderKL
    from pixart.models.pixart_checkpoint import load_pixart
    from pixart.models.text_encoder import encode_prompts_staged
    from pixart.pipelines.loading import merge_loras
    from pixart.pipelines.text_to_image import PixArtPipeline, TextEmbeddings
    from pixart.runtime import setup_device
    from tools.digits.data import NUMBER_WORDS

    setup_device("CPU")
    model_dir = os.path.join(ROOT, "models", "pixart-digits")
    prompts = [f"the digit {w}" for w in NUMBER_WORDS] * 2
    emb, mask = encode_prompts_staged(prompts + [""], os.path.join(model_dir, "text_encoder"),
                                      os.path.join(model_dir, "tokenizer"), 16)
    text, null = TextEmbeddings(emb[:-1], mask[:-1]), TextEmbeddings(emb[-1:], mask[-1:])
    vae = AutoencoderKL.from_pretrained(os.path.join(model_dir, "vae"))
    teacher, _ = load_pixart(os.path.join(model_dir, "transformer.ckpt"))
    student, _ = load_pixart(os.path.join(model_dir, "transformer.ckpt"))
    merge_loras(student, [args.lora_path])
    samplers = {"teacher": (PixArtPipeline(teacher, vae), "dpm", 20, 4.5),
                "lcm": (PixArtPipeline(student, vae), "lcm", args.lcm_steps, 0.0)}
    # the two alternate, so that this machine's drifting speed affects both alike
    runs = {name: [] for name in samplers}
    for _ in range(args.repeats + 2):  # the first two runs of each compile
        for name, (pipeline, method, steps, guidance) in samplers.items():
            runs[name].append(timed_run(pipeline, text, null, method, steps, guidance))
    teacher, lcm = ((len(prompts) / statistics.median(t for t, _ in runs[name][2:]),
                     statistics.median(d for _, d in runs[name][2:])) for name in samplers)
    print(f"{cpu_description()}, batch of {len(prompts)} 32x32 images, graph mode, median of {args.repeats}")
    print("| sampler | images/s | speed-up | denoising s per batch | speed-up |\n|---|---|---|---|---|")
    for name, (rate, seconds) in (("teacher, DPM-Solver++ 20 steps, guidance 4.5", teacher),
                                  (f"LCM-LoRA, {args.lcm_steps} LCM steps, no guidance", lcm)):
        print(f"| {name} | {rate:.1f} | {rate / teacher[0]:.1f}x | {seconds:.2f} | {teacher[1] / seconds:.1f}x |")

if __name__ == "__main__":
    main()
