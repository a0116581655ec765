#!/usr/bin/env python
"""Train the miniature model's VAE on the MNIST digits and save it as a diffusers folder.

    python -m tools.digits.prepare                   # data/digits/{train,heldout}.json
    python -m tools.digits.train_vae                 # -> models/pixart-digits/vae/

A small ``AutoencoderKL`` (our MindSpore cells, the ones the full-size pipeline uses):
3 x 32 x 32 RGB in [-1, 1] -> 4 x 8 x 8 latents (three levels, downsampling factor 4).
Loss: mean L1 reconstruction error plus ``--kl_weight`` times the KL divergence of the
posterior from N(0, I) (summed over a latent, averaged over the batch); no GAN or
perceptual loss, which MNIST does not need. Adam with a cosine learning-rate decay.

Afterwards ``scaling_factor`` is set to 1 / std of posterior samples of the training
digits, as Stable Diffusion did, so that the diffusion model sees unit-variance latents.
Written: ``config.json`` (diffusers ``AutoencoderKL`` fields) and
``diffusion_pytorch_model.safetensors`` (diffusers key names), loadable by diffusers and
by ``pixart.models.autoencoder_kl.AutoencoderKL.from_pretrained``. The reconstruction
MSE of the held-out digits is printed, and a preview PNG (originals above their
reconstructions) is saved.
"""
import argparse
import json
import os
import sys
import time

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops
from PIL import Image
from tqdm import tqdm

from tools.digits.data import load_digit_images
from pixart.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig, split_moments
from pixart.utils.safetensors_io import save_file

LATENT_CHANNELS = 4


def vae_config(block_out_channels, norm_num_groups: int, sample_size: int, scaling_factor: float = 1.0) -> dict:
    """A diffusers ``AutoencoderKL`` config.json dict (one resnet per encoder level, mid-block attention)."""
    n = len(block_out_channels)
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1",
        "in_channels": 3, "out_channels": 3, "latent_channels": LATENT_CHANNELS,
        "block_out_channels": list(block_out_channels), "layers_per_block": 1, "norm_num_groups": norm_num_groups,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "act_fn": "silu", "sample_size": sample_size, "mid_block_add_attention": True,
        "use_quant_conv": True, "use_post_quant_conv": True, "force_upcast": False,
        "scaling_factor": scaling_factor, "shift_factor": None, "latents_mean": None, "latents_std": None,
    }


def init_weights(vae, seed: int) -> None:
    """PyTorch's default initialisation, seeded: every weight and bias U(-b, b), b = fan_in ** -0.5
    (fan_in = input channels x kernel area); GroupNorm keeps weight 1, bias 0. Our cells start
    at zero, which would never train."""
    rng = np.random.default_rng(seed)
    params = dict(vae.parameters_and_names())
    for name, param in params.items():
        if ".norm" in name or "group_norm" in name or "conv_norm_out" in name:
            continue
        weight = params[name.rsplit(".", 1)[0] + ".weight"]
        bound = float(np.prod(weight.shape[1:])) ** -0.5
        param.set_data(ms.Tensor(rng.uniform(-bound, bound, param.shape).astype(np.float32)))


def to_model_space(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    return (images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) float in about [-1, 1] -> (N, H, W, 3) uint8."""
    return (np.clip(x, -1, 1).transpose(0, 2, 3, 1) * 127.5 + 127.5).round().astype(np.uint8)


def make_train_step(vae, optimizer, kl_weight: float):
    """A graph-compiled step: (images (B, 3, H, W), noise (B, 4, h, w)) -> (loss, L1, KL), updating the weights."""
    def loss_fn(x, noise):
        mean, logvar = split_moments(vae.quant_conv(vae.encoder(x)))
        reconstruction = vae.decode(mean + ops.exp(0.5 * logvar) * noise)
        l1 = ops.abs(reconstruction - x).mean()
        kl = 0.5 * (mean * mean + ops.exp(logvar) - 1.0 - logvar).sum() / x.shape[0]
        return l1 + kl_weight * kl, l1, kl

    grad_fn = ms.value_and_grad(loss_fn, None, optimizer.parameters, has_aux=True)

    @ms.jit
    def step(x, noise):
        (loss, l1, kl), grads = grad_fn(x, noise)
        optimizer(grads)
        return loss, l1, kl

    return step


def batched(fn, x: np.ndarray, batch_size: int) -> np.ndarray:
    """``fn`` (a compiled Tensor -> Tensor function) over ``x`` in batches, concatenated as NumPy."""
    return np.concatenate([fn(Tensor(x[s:s + batch_size])).asnumpy() for s in range(0, len(x), batch_size)])


def save_preview(originals: np.ndarray, reconstructions: np.ndarray, path: str, zoom: int = 4) -> None:
    """Originals in the top row, their reconstructions below, both (N, H, W, 3) uint8."""
    grid = np.concatenate([np.concatenate(list(originals), axis=1), np.concatenate(list(reconstructions), axis=1)])
    Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.NEAREST).save(path)


def save_vae(vae, config: dict, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    tensors = {name: p.asnumpy().astype(np.float32) for name, p in sorted(vae.parameters_and_names())}
    save_file(tensors, os.path.join(folder, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_json", default="data/digits/train.json", help="training label file")
    p.add_argument("--heldout_json", default="data/digits/heldout.json", help="held-out label file (evaluation)")
    p.add_argument("--output_dir", default="models/pixart-digits/vae", help="where to save the VAE folder")
    p.add_argument("--block_out_channels", type=int, nargs="+", default=[16, 32, 64],
                   help="channels per level; the image is downsampled 2x between levels (default: 16 32 64)")
    p.add_argument("--norm_num_groups", type=int, default=16,
                   help="GroupNorm groups; must divide every block_out_channels entry (default: 16)")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps (default: 400)")
    p.add_argument("--batch_size", type=int, default=32, help="images per step (default: 32)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, cosine-decayed to 5%% (default: 2e-3)")
    p.add_argument("--kl_weight", type=float, default=1e-6, help="weight of the KL term (default: 1e-6)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the batches and the noise (default: 0)")
    p.add_argument("--preview", default="/tmp/vae_recon.png",
                   help="PNG of held-out digits over their reconstructions (default: /tmp/vae_recon.png)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    for path in (args.train_json, args.heldout_json):
        if not os.path.isfile(path):
            sys.exit(f"error: {path} not found; run python -m tools.digits.prepare first")
    train_images, _ = load_digit_images(args.train_json)
    heldout_images, heldout_digits = load_digit_images(args.heldout_json)
    train_x, heldout_x = to_model_space(train_images), to_model_space(heldout_images)
    config = vae_config(args.block_out_channels, args.norm_num_groups, train_x.shape[-1])
    try:
        vae = AutoencoderKL(AutoencoderKLConfig.from_hf(config))
    except ValueError as e:
        sys.exit(f"error: {e}")
    init_weights(vae, args.seed)
    n_params = sum(int(np.prod(p.shape)) for p in vae.get_parameters())
    print(f"VAE {args.block_out_channels}: {n_params / 1e6:.2f}M parameters; {len(train_x)} training, "
          f"{len(heldout_x)} held-out digits")

    schedule = args.lr * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * np.arange(args.steps) / args.steps)))
    optimizer = nn.Adam(vae.trainable_params(), learning_rate=schedule.astype(np.float32).tolist())
    step = make_train_step(vae, optimizer, args.kl_weight)
    vae.set_train(True)
    rng = np.random.default_rng(args.seed)
    latent = train_x.shape[-1] // vae.config.downsample_factor
    order, cursor = rng.permutation(len(train_x)), 0
    start = time.time()
    bar = tqdm(range(args.steps), desc="training VAE", unit="step")
    for _ in bar:
        if cursor + args.batch_size > len(order):  # new epoch
            order, cursor = rng.permutation(len(train_x)), 0
        batch = train_x[order[cursor:cursor + args.batch_size]]
        cursor += args.batch_size
        noise = rng.standard_normal((len(batch), LATENT_CHANNELS, latent, latent)).astype(np.float32)
        loss, l1, kl = step(Tensor(batch), Tensor(noise))
        bar.set_postfix(loss=f"{float(loss):.4f}", l1=f"{float(l1):.4f}", kl=f"{float(kl):.0f}")
    print(f"trained {args.steps} steps in {(time.time() - start) / 60:.1f} min")

    vae.set_train(False)

    @ms.jit
    def encode(x):  # (B, 3, H, W) -> (B, 8, h, w): mean, then clamped log-variance
        return ops.concat(split_moments(vae.quant_conv(vae.encoder(x))), axis=1)

    decode = ms.jit(vae.decode)
    mean, logvar = np.split(batched(encode, train_x, 250), 2, axis=1)
    samples = mean + np.exp(0.5 * logvar) * rng.standard_normal(mean.shape).astype(np.float32)
    config["scaling_factor"] = float(1.0 / samples.std())
    heldout_mean = np.split(batched(encode, heldout_x, 250), 2, axis=1)[0]
    reconstructions = batched(decode, heldout_mean, 250)
    mse = float(((reconstructions - heldout_x) ** 2).mean())
    print(f"latents: mean {samples.mean():.3f}, std {samples.std():.3f} -> scaling_factor {config['scaling_factor']:.4f}")
    print(f"held-out reconstruction MSE (images in [-1, 1]): {mse:.5f} (PSNR {10 * np.log10(4.0 / mse):.1f} dB)")
    save_vae(vae, config, args.output_dir)
    print(f"saved {args.output_dir}")
    if args.preview:
        shown = np.concatenate([np.flatnonzero(heldout_digits == d)[:2] for d in range(10)])
        save_preview(heldout_images[shown], to_uint8(reconstructions[shown]), args.preview)
        print(f"preview: {args.preview}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
