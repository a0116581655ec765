"""A small MNIST-digit CNN: the judge of the miniature model's samples.

Trained on the held-out real digits of ``tools/digits/prepare.py`` (which the generator
never saw) with random small rotations, scalings and shifts, it gives
``tools/digits/evaluate.py`` two things: the digit a generated image shows (prompt
adherence) and a 128-d penultimate feature vector per image (the space of the Fréchet
distance, as Inception's pool features are for FID).

    (B, 1, 32, 32) grey in [0, 1]
    -> 3 x [3x3 conv, ReLU, 2x2 max-pool]: w, 2w, 4w channels (w = 32), 32 -> 4 pixels
    -> Dense 64w -> 128, ReLU (features) -> Dense 128 -> 10 (logits)

The convolutions are im2col (``ops.unfold``, which also pads) plus a matmul: MindSpore's
CPU convolution kernel is about 10x slower, and back-propagating through ``ops.pad`` in a
compiled graph hangs in MindSpore 2.10 on CPU. Weights are saved as ``model.safetensors``
+ ``config.json``.
"""
from __future__ import annotations

import json
import os
from typing import Tuple

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer
from PIL import Image
from tqdm import tqdm

from pixart.errors import ModelLoadError
from pixart.utils.hf_folder import load_folder_weights, read_folder_config
from pixart.utils.safetensors_io import save_file

SIDE = 32
# training augmentation, the range of natural handwriting variation (measured on the 4,500
# training digits: shifts alone gave 95.1% accuracy, this with width 32 gives 96.2%)
MAX_SHIFT = 2.0     # pixels each way: the 2-pixel border of the 32x32 digits
MAX_ROTATION = 12.0  # degrees each way
MAX_SCALE = 0.1     # relative, each way


class Conv3x3(nn.Cell):
    """3x3 convolution, stride 1, zero padding 1: (B, C, H, W) -> (B, O, H, W); torch's layout."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.weight = Parameter(initializer("zeros", (out_channels, in_channels, 3, 3), ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (out_channels,), ms.float32), name="bias")

    def construct(self, x):
        b, c, h, w = x.shape
        out_channels = self.weight.shape[0]
        cols = ops.unfold(x, 3, 1, 1, 1)  # (B, C*9, H*W)
        y = ops.matmul(self.weight.reshape(out_channels, c * 9), cols) + self.bias.reshape(1, out_channels, 1)
        return y.reshape(b, out_channels, h, w)


class DigitClassifier(nn.Cell):
    """(B, 1, 32, 32) grey images in [0, 1] -> (B, 10) logits; ``features`` gives (B, feature_dim)."""

    def __init__(self, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim}
        chans = (1, width, 2 * width, 4 * width)
        self.convs = nn.CellList([Conv3x3(chans[i], chans[i + 1]) for i in range(3)])
        self.fc = nn.Dense(chans[-1] * (SIDE // 8) ** 2, feature_dim)
        self.head = nn.Dense(feature_dim, 10)

    def features(self, x):
        for conv in self.convs:
            x = ops.relu(conv(x))
            b, c, h, w = x.shape
            x = x.reshape(b, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
        return ops.relu(self.fc(x.reshape(x.shape[0], -1)))

    def construct(self, x):
        return self.head(self.features(x))

    def logits_and_features(self, x):
        f = self.features(x)
        return self.head(f), f


def to_input(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) or (N, H, W) uint8 -> (N, 1, 32, 32) float32 grey in [0, 1] (resized if needed)."""
    images = np.asarray(images)
    grey = images.mean(axis=-1) if images.ndim == 4 else images.astype(np.float32)
    if grey.shape[1:] != (SIDE, SIDE):
        grey = np.stack([np.asarray(Image.fromarray(g.astype(np.float32)).resize((SIDE, SIDE), Image.BILINEAR))
                         for g in grey])
    return (grey / 255.0).astype(np.float32)[:, None]


def _random_affine(x: np.ndarray, rng) -> np.ndarray:
    """(N, 1, 32, 32): each image rotated, scaled and shifted at random about its centre (bilinear)."""
    out = np.empty_like(x)
    centre = (SIDE - 1) / 2
    for i in range(len(x)):
        angle = np.deg2rad(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
        scale = rng.uniform(1 - MAX_SCALE, 1 + MAX_SCALE)
        dy, dx = rng.uniform(-MAX_SHIFT, MAX_SHIFT, 2)
        cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
        # PIL maps each output pixel (u, v) to the input pixel (a u + b v + c, d u + e v + f)
        inverse = (cos, sin, centre - cos * centre - sin * centre - dx,
                   -sin, cos, centre + sin * centre - cos * centre - dy)
        out[i, 0] = np.asarray(Image.fromarray(x[i, 0]).transform((SIDE, SIDE), Image.AFFINE, inverse,
                                                                  resample=Image.BILINEAR))
    return out


def _init_weights(model: DigitClassifier, seed: int) -> None:
    """PyTorch's default initialisation, seeded: U(-b, b), b = fan_in ** -0.5."""
    rng = np.random.default_rng(seed)
    params = dict(model.parameters_and_names())
    for name, param in params.items():
        fan_in = float(np.prod(params[name.rsplit(".", 1)[0] + ".weight"].shape[1:]))
        param.set_data(Tensor(rng.uniform(-1, 1, param.shape).astype(np.float32) * fan_in ** -0.5))


def train_classifier(images: np.ndarray, digits: np.ndarray, epochs: int = 80, batch_size: int = 50,
                     lr: float = 2e-3, seed: int = 0) -> DigitClassifier:
    """Train on (N, H, W, 3) uint8 images and their (N,) digits; returns the model in eval mode."""
    x, y = to_input(images), np.asarray(digits, np.int32)
    model = DigitClassifier()
    _init_weights(model, seed)
    optimizer = nn.Adam(model.trainable_params(), learning_rate=lr, weight_decay=1e-4)
    loss_fn = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")

    def loss_of(xb, yb):
        return loss_fn(model(xb), yb)

    grad_fn = ms.value_and_grad(loss_of, None, optimizer.parameters)

    @ms.jit
    def step(xb, yb):
        loss, grads = grad_fn(xb, yb)
        optimizer(grads)
        return loss

    model.set_train(True)
    rng = np.random.default_rng(seed)
    steps = len(x) // batch_size  # whole batches only: one compiled shape
    bar = tqdm(range(epochs), desc="training digit classifier", unit="epoch")
    for _ in bar:
        order = rng.permutation(len(x))
        augmented = _random_affine(x, rng)
        losses = [float(step(Tensor(augmented[idx]), Tensor(y[idx])))
                  for idx in np.split(order[:steps * batch_size], steps)]
        bar.set_postfix(loss=f"{np.mean(losses):.4f}")
    model.set_train(False)
    return model


def predict(model: DigitClassifier, images: np.ndarray, batch_size: int = 250) -> Tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 3) uint8 -> (predicted digits (N,) int64, penultimate features (N, feature_dim) float32)."""
    x = to_input(images)
    forward = ms.jit(model.logits_and_features)
    logits, feats = [], []
    for start in range(0, len(x), batch_size):
        lg, f = forward(Tensor(x[start:start + batch_size]))
        logits.append(lg.asnumpy())
        feats.append(f.asnumpy())
    return np.concatenate(logits).argmax(axis=1), np.concatenate(feats)


def save_classifier(model: DigitClassifier, folder: str, **info) -> None:
    """``config.json`` (sizes plus ``info``, e.g. the accuracy) and ``model.safetensors``."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**model.config, **info}, f, indent=2, sort_keys=True)
        f.write("\n")
    tensors = {name: p.asnumpy() for name, p in sorted(model.parameters_and_names())}
    save_file(tensors, os.path.join(folder, "model.safetensors"))


def load_classifier(folder: str) -> DigitClassifier:
    config = read_folder_config(folder, "digit classifier")
    try:
        model = DigitClassifier(int(config["width"]), int(config["feature_dim"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"digit classifier: {folder}/config.json needs integer width and feature_dim ({e})")
    load_folder_weights(model, folder, "model")
    model.set_train(False)
    return model
