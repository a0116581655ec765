"""Prompts to T5 embeddings: tokenizer loading, tokenization, and encoding (also staged).

Tokenization is exactly what diffusers' PixArt pipelines do: the Hugging Face T5 tokenizer
with ``padding="max_length", truncation=True, add_special_tokens=True`` (300 tokens for
PixArt-Σ, 120 for PixArt-α). It needs ``transformers`` but not PyTorch; arrays are NumPy.

``encode_prompts`` runs the encoder on the prompts' tokens without their shared padding
(``unpadded_length``) and returns zeros at the padded positions, which every attention masks out.

``encode_prompts_staged`` loads the encoder, encodes, and frees it before returning (memory
handed back to the OS), so a pipeline that calls it before loading the transformer and the
VAE peaks at the text encoder alone (19 GB for T5-XXL in fp32) instead of the sum of all
three models.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import os
from typing import Sequence, Tuple, Union

import numpy as np
import mindspore as ms
from mindspore import Tensor

from pixart.models.t5 import T5Encoder
from pixart.errors import InputError, ModelLoadError

logger = logging.getLogger(__name__)

Prompts = Union[str, Sequence[str]]
PADDING_STEP = 64  # trimmed captions keep a multiple of this many tokens: few lengths, few compiled graphs


def unpadded_length(mask: np.ndarray, step: int = PADDING_STEP) -> int:
    """How many leading tokens of captions with attention ``mask`` (B, L) hold every kept token:
    one past the last kept token of any row, up to a multiple of ``step``, at most L. A padded
    token gets a large negative bias in T5's and the transformer's attention, so its weight is
    exactly 0 in fp32, and whatever comes after the kept tokens can be left out with the same
    results. Except when a row keeps no token: it attends evenly to all of its padding, so the
    answer is then L."""
    kept = np.asarray(mask) != 0
    length = kept.shape[1]
    if not kept.any(axis=1).all():
        return length
    used = int(np.max(length - np.argmax(kept[:, ::-1], axis=1)))
    return min(length, -(-used // step) * step)


def load_tokenizer(folder: str):
    """The tokenizer in a Hugging Face tokenizer folder (spiece.model and/or tokenizer.json)."""
    from transformers import AutoTokenizer  # deferred: importing transformers takes seconds

    if not os.path.isdir(folder):
        raise ModelLoadError(f"T5 tokenizer: folder {folder!r} does not exist")
    found = ", ".join(sorted(os.listdir(folder))) or "nothing"
    if not any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "spiece.model")):
        raise ModelLoadError(f"T5 tokenizer: {folder!r} has neither tokenizer.json nor spiece.model (found {found})")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"T5 tokenizer: cannot load {folder!r} (found {found}): {e}") from None


def check_prompt(prompt: str, what: str = "the prompt") -> None:
    """InputError for a prompt with nothing to draw (empty or only whitespace): the one rule for
    sample.py and the web demo."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"{what} is empty: describe the image you want")


def normalize_prompt(prompt: str) -> str:
    """What diffusers' PixArt pipelines do to a prompt before tokenizing it (without their optional
    bs4/ftfy caption cleaning): lowercase and strip. T5's tokenizer is case-sensitive, so this
    is needed for the same embeddings."""
    return prompt.lower().strip()


def tokenize(prompts: Prompts, tokenizer, max_length: int) -> Tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, both (B, max_length) int64, padded and truncated.

    A prompt longer than ``max_length`` tokens (the closing ``</s>`` included) keeps its
    first ``max_length - 1`` tokens plus ``</s>``; a warning says how many were dropped.
    """
    prompts = _as_list(prompts)
    enc = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    full_rows = [i for i in range(len(prompts)) if mask[i, -1]]  # only these can have been cut
    if full_rows:
        full = tokenizer([prompts[i] for i in full_rows], add_special_tokens=True, verbose=False)["input_ids"]
        for i, tokens in zip(full_rows, full):
            dropped = len(tokens) - max_length
            if dropped > 0:
                text = tokenizer.decode(tokens[max_length - 1:-1], skip_special_tokens=True)
                logger.warning("prompt %d is %d tokens long, the text encoder takes %d: dropped the last %d "
                               "token(s): %r", i, len(tokens), max_length, dropped, text)
    return ids, mask


def encode_prompts(prompts: Prompts, tokenizer, text_encoder, max_length: int,
                   batch_size: int = 4, encode_padding: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Prompts -> (embeddings (B, max_length, D) float32, mask (B, max_length) int64).

    ``text_encoder``: a ``T5Encoder``, or a compiled function of one, ``(ids, mask) -> hidden
    states``. Runs it ``batch_size`` prompts at a time, which bounds activation memory, on the
    chunk's ``unpadded_length`` tokens: the kept tokens' embeddings are the same as over all
    ``max_length`` (T5 leaves the padding out of its attention and works per token elsewhere),
    and the padded positions' embeddings are zero, which every attention masks out. A short
    prompt at PixArt-Σ's 300 tokens so takes less than half of the encoder's time.
    ``encode_padding``: encode all ``max_length`` tokens (diffusers' padded embeddings exactly;
    one shape for a compiled encoder).
    """
    ids, mask = tokenize(prompts, tokenizer, max_length)
    out = []
    for start in range(0, len(ids), batch_size):
        chunk = slice(start, start + batch_size)
        keep = max_length if encode_padding else unpadded_length(mask[chunk])
        hidden = text_encoder(Tensor(ids[chunk, :keep].astype(np.int32)), Tensor(mask[chunk, :keep]))
        hidden = hidden.asnumpy().astype(np.float32, copy=False)
        if keep < max_length:
            hidden = np.pad(hidden, ((0, 0), (0, max_length - keep), (0, 0)))
        out.append(hidden)
    return np.concatenate(out), mask


def encode_prompts_staged(prompts: Prompts, text_encoder_folder: str, tokenizer, max_length: int,
                          dtype=ms.float32, batch_size: int = 4) -> Tuple[np.ndarray, np.ndarray]:
    """Load the T5 encoder from its folder, encode the prompts, release the encoder.

    ``tokenizer`` is a loaded tokenizer or its folder. Returns what ``encode_prompts``
    returns, as NumPy arrays that hold no reference to the encoder, so its memory is
    reclaimed before the caller loads the next model.
    """
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(os.fspath(tokenizer))
    text_encoder = T5Encoder.from_pretrained(text_encoder_folder, dtype=dtype)
    try:
        return encode_prompts(prompts, tokenizer, text_encoder, max_length, batch_size)
    finally:
        del text_encoder
        _return_freed_memory()


def _return_freed_memory() -> None:
    """Collect garbage, then hand freed heap pages back to the OS. glibc keeps the freed blocks
    of a model's many mid-size buffers (below its 32 MB mmap threshold) in its arenas, so
    without the trim the process would keep most of the released encoder's memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to trim
        pass


def _as_list(prompts: Prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad or not prompts:
        raise ValueError(f"prompts must be a string or a non-empty list of strings, got "
                         f"{'an empty list' if not prompts else 'items of type ' + ', '.join(sorted(set(bad)))}")
    return prompts
