#!/usr/bin/env python
"""20-step sampling: our pipeline (MindSpore, compiled) vs diffusers' PixArtSigmaPipeline (PyTorch).

XL/2 transformer and an SDXL-sized VAE, random weights, 512px, DPM-Solver++ with guidance
(batch 2 through the transformer). T5-XXL is left out on both sides (random caption
embeddings are passed in), as its cost does not depend on the framework loop we compare.
Same machine, one run, both timed end to end from initial latents to uint8 images.

    python -m benchmarks.bench_sampling                # 512px, 20 steps
    python -m benchmarks.bench_sampling --size 256 --steps 10 --mode streamed

Our denoiser runs compiled whole (``--mode graph``) by default, as ``sample.py`` does (XL/2 at
512px: 5.5 GiB, bench_forward_memory.py); ``--mode streamed``, whose memory does not grow with
the depth, ran 1.27x its time on the Intel AMX machine (bench_transformer at 512px).
"""
import argparse
import os
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--mode", choices=["graph", "streamed"], default="graph", help="our denoiser's execution mode")
    args = ap.parse_args()

    import mindspore as ms
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    from pixart.models.autoencoder_kl import AutoencoderKL as MsAutoencoderKL, AutoencoderKLConfig
    from pixart.models.pixart import PixArtConfig, build_model
    from pixart.models.pixart_checkpoint import diffusers_to_official
    from pixart.pipelines.text_to_image import PixArtPipeline, TextEmbeddings

    torch.set_num_threads(args.threads)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    torch.manual_seed(0)
    latent = args.size // 8
    transformer = PixArtTransformer2DModel(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        cross_attention_dim=1152, sample_size=latent, patch_size=2, caption_channels=4096,
        interpolation_scale=latent / 64, use_additional_conditions=False).eval()
    vae_config = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                      layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.13025,
                      force_upcast=True)
    vae = AutoencoderKL(**vae_config).eval()
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                            algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                            lower_order_final=True, timestep_spacing="linspace", steps_offset=0)
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                               scheduler=scheduler)

    model = build_model(PixArtConfig(input_size=latent, pe_interpolation=latent / 64))
    params = dict(model.parameters_and_names())
    for name, value in diffusers_to_official({k: v.numpy() for k, v in transformer.state_dict().items()}).items():
        params[name].set_data(ms.Tensor(value))
    model.set_train(False)
    ms_vae = MsAutoencoderKL(AutoencoderKLConfig.from_hf({**vae_config, "_class_name": "AutoencoderKL"}))
    vae_params = dict(ms_vae.parameters_and_names())
    for name, value in vae.state_dict().items():
        vae_params[name].set_data(ms.Tensor(value.numpy()))
    ours = PixArtPipeline(model, ms_vae, mode=args.mode)

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((1, 300, 4096)).astype(np.float32)
    neg = rng.standard_normal((1, 300, 4096)).astype(np.float32)
    mask = np.zeros((1, 300), np.int64)
    mask[:, :40] = 1
    neg_mask = np.zeros((1, 300), np.int64)
    neg_mask[:, :1] = 1
    latents = rng.standard_normal((1, 4, latent, latent)).astype(np.float32)

    def run_theirs():
        with torch.no_grad():
            # negative_prompt=None: diffusers refuses its default "" beside negative_prompt_embeds
            return pipe(prompt_embeds=torch.from_numpy(emb), prompt_attention_mask=torch.from_numpy(mask),
                        negative_prompt=None, negative_prompt_embeds=torch.from_numpy(neg),
                        negative_prompt_attention_mask=torch.from_numpy(neg_mask), latents=torch.from_numpy(latents),
                        num_inference_steps=args.steps, guidance_scale=4.5, height=args.size, width=args.size,
                        use_resolution_binning=False, output_type="np").images

    def run_ours(steps=args.steps):
        return ours(TextEmbeddings(emb, mask), TextEmbeddings(neg, neg_mask), args.size, args.size,
                    sampling_steps=steps, guidance_scale=4.5, latents=latents, use_resolution_binning=False)

    start = time.perf_counter()
    run_ours(steps=2)  # compiles: graphs depend on the shapes only, not on the step count
    first = time.perf_counter() - start
    start = time.perf_counter()
    result = run_ours()
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    theirs = run_theirs()
    t_theirs = time.perf_counter() - start
    mad = np.abs(result.images.astype(np.float64) - (theirs * 255).round()).mean()
    start = time.perf_counter()
    ours.decode(latents)
    decode_ours = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        vae.decode(torch.from_numpy(latents) / vae.config.scaling_factor)
    decode_theirs = time.perf_counter() - start
    from benchmarks.bench_transformer import forward_flops
    from benchmarks.machine import cpu_description, gemm_peak_rates
    from pixart.models.text_encoder import unpadded_length

    ms_peak, torch_peak = gemm_peak_rates()
    print(f"\n{args.steps}-step DPM-Solver++ sampling at {args.size}px, XL/2 + SDXL-sized VAE, {args.threads} threads")
    print(f"{cpu_description()}; GEMM peak (2048^3 fp32): MindSpore {ms_peak:.0f}, PyTorch {torch_peak:.0f} GFLOP/s")
    print("| pipeline | total (s) | s/step (denoiser) | ratio ours/diffusers |")
    print("|---|---|---|---|")
    print(f"| ours, {args.mode} mode | {t_ours:.1f} | {result.seconds_per_step:.2f} | {t_ours / t_theirs:.2f} |")
    print(f"| diffusers PixArtSigmaPipeline | {t_theirs:.1f} | {t_theirs / args.steps:.2f} (incl. decode) | 1.00 |")
    print(f"VAE decode alone (in both totals): ours {decode_ours:.1f} s, diffusers {decode_theirs:.1f} s, "
          f"ratio {decode_ours / decode_theirs:.2f}")
    print(f"our 2-step warm-up run incl. compilation: {first:.1f} s; mean abs image difference {mad:.3f}/255")
    # An fp32 denoiser at parity does these multiplications whatever else it does: at MindSpore's
    # GEMM peak, and with nothing but them, it could not beat this bound on this machine.
    caption_tokens = unpadded_length(np.concatenate([neg_mask, mask]))
    step_flops = forward_flops((latent // 2) ** 2, caption_tokens)
    fastest = args.steps * step_flops / (ms_peak * 1e9) + decode_ours
    rate = step_flops / result.seconds_per_step / 1e9
    print(f"our denoiser ({caption_tokens} caption tokens): {step_flops / 1e12:.2f} TFLOP a step at {rate:.0f} "
          f"GFLOP/s ({rate / ms_peak:.0%} of MindSpore's GEMM peak); "
          f"with every step at that peak and this decode, the run would take {fastest:.1f} s, "
          f"ratio {fastest / t_theirs:.2f}")


if __name__ == "__main__":
    main()
