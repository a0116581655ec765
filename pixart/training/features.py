"""Frozen feature extractors of training: images -> VAE posterior, captions -> T5 embeddings.

PixArt trains the transformer only; the VAE and T5 are frozen, so their outputs can be
computed on the fly (``FeatureEncoder``) or once for the whole dataset
(``tools/cache_features.py``), after which training needs neither model.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor

from pixart.runtime import jit

NULL_CAPTION_FILE = "null_caption.npz"


def feature_dtype(name: str, device: str):
    """The dtype the frozen VAE and T5 run in for the training dtype ``name``: that dtype on Ascend
    and GPU (half the memory and time of fp32), fp32 on CPU whatever ``name`` says (MindSpore has
    no half-precision CPU matmuls), so a cache made on CPU serves a half-precision run elsewhere.
    The VAE keeps fp32 where its config asks (``force_upcast``); features come out as fp32."""
    from pixart.runtime import compute_dtype

    return compute_dtype("fp32" if device == "CPU" else name, device)


class FeatureEncoder:
    """T5 + VAE, frozen and compiled (each input shape once: about 3x PyNative's speed on CPU).
    ``max_length`` is the transformer's caption token count; a class-conditional model's encoder
    has the VAE alone (no tokenizer, text encoder or length)."""

    def __init__(self, vae, tokenizer=None, text_encoder=None, max_length: int = 0):
        self.vae = vae
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length = max_length

        def moments(images):
            out = vae.encoder(images.astype(vae.compute_dtype))
            return out if vae.quant_conv is None else vae.quant_conv(out)

        def hidden_states(ids, mask):
            return text_encoder(ids, mask)

        self._moments = jit(moments)
        self._hidden_states = jit(hidden_states)

    @classmethod
    def from_folders(cls, vae_root: str, tokenizer_root: Optional[str] = None, text_encoder_root: Optional[str] = None,
                     max_length: int = 0, dtype: str = "fp32"):
        """The encoder of the model folders; ``dtype`` the training's --dtype (see ``feature_dtype``)."""
        from pixart.models.autoencoder_kl import AutoencoderKL
        from pixart.models.t5 import T5Encoder
        from pixart.models.text_encoder import load_tokenizer

        dtype = feature_dtype(dtype, ms.get_context("device_target"))
        vae = AutoencoderKL.from_pretrained(vae_root, dtype=dtype)
        if text_encoder_root is None:
            return cls(vae)
        return cls(vae, load_tokenizer(tokenizer_root), T5Encoder.from_pretrained(text_encoder_root, dtype=dtype),
                   max_length)

    def encode_images(self, images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(B, 3, H, W) in [-1, 1] -> posterior (mean, std), each (B, C, H/f, W/f), unscaled."""
        from pixart.models.autoencoder_kl import DiagonalGaussian

        posterior = DiagonalGaussian(self._moments(Tensor(images.astype(np.float32))))
        return posterior.mean.asnumpy(), posterior.std.asnumpy()

    def encode_captions(self, captions: List[str]) -> Tuple[np.ndarray, np.ndarray]:
        """B captions -> (embeddings (B, L, D) float32, mask (B, L) int32)."""
        from pixart.models.text_encoder import encode_prompts

        # all of the padding: one compiled shape, and T5("")'s padded positions are the null caption
        emb, mask = encode_prompts(captions, self.tokenizer, self._hidden_states, self.max_length, encode_padding=True)
        return emb, mask.astype(np.int32)

    def null_caption(self) -> np.ndarray:
        """T5("") padded to ``max_length``, (L, D): the official finetuning's null caption."""
        return self.encode_captions([""])[0][0]
