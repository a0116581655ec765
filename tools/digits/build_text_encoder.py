#!/usr/bin/env python
"""Build the miniature model's tokenizer and its small frozen T5 encoder.

    python -m tools.digits.build_text_encoder                 # -> models/pixart-digits/{tokenizer,text_encoder}

The full-size model reads prompts through a SentencePiece tokenizer and T5-XXL. The
miniature one goes through the same loaders (``load_tokenizer``, ``T5Encoder``) with:

* ``tokenizer/``: a word-level tokenizer (``tokenizers`` WordLevel model, lowercase,
  split on whitespace and punctuation) whose vocabulary is ``<pad>`` (0), ``</s>`` (1),
  ``<unk>`` (2), the numerals 0-9, the number words and every word of the digit captions
  (``tools.digits.data``). Like T5's, it appends ``</s>``; any other word becomes
  ``<unk>``. Saved as tokenizer.json, tokenizer_config.json and special_tokens_map.json,
  which ``transformers.AutoTokenizer`` loads as a ``PreTrainedTokenizerFast``.
* ``text_encoder/``: a T5 v1.1-style encoder (gated-GELU, RMS norms, relative position
  bias) that is never trained: its weights are drawn once with a fixed seed, with T5's own
  initialisation, and the transformer learns to read them. Saved as a transformers
  ``T5EncoderModel`` folder (config.json and model.safetensors with its key names).

No PyTorch is needed and the output is byte-for-byte the same on every run.
"""
import argparse
import json
import os
import sys

import numpy as np

from tools.digits.data import NUMBER_WORDS, all_captions
from pixart.utils.safetensors_io import save_file

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2: T5's pad, eos and unk ids
PAD_ID, EOS_ID = 0, 1
MAX_LENGTH = 16
EXTRA_TOKENS = (".", ",")  # punctuation a user may end a prompt with


def build_tokenizer():
    """The word-level ``tokenizers.Tokenizer`` described in the module docstring."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])
    normalizer = normalizers.Lowercase()
    words = {word for text in all_captions() for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text))}
    words |= {str(d) for d in range(10)} | set(NUMBER_WORDS) | set(EXTRA_TOKENS)
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(sorted(words)))}

    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", EOS_ID)])
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))  # never split or lowercased, skipped when decoding
    return tokenizer


def save_tokenizer(tokenizer, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": MAX_LENGTH,
              "padding_side": "right", "truncation_side": "right", "clean_up_tokenization_spaces": False, **special}
    _write_json(os.path.join(folder, "tokenizer_config.json"), config)
    _write_json(os.path.join(folder, "special_tokens_map.json"), special)


def t5_config(vocab_size: int, d_model: int, num_layers: int, num_heads: int, d_kv: int, d_ff: int) -> dict:
    """A transformers T5 ``config.json`` for an encoder of these sizes (v1.1 choices elsewhere)."""
    return {
        "architectures": ["T5EncoderModel"], "model_type": "t5",
        "vocab_size": vocab_size, "d_model": d_model, "d_kv": d_kv, "d_ff": d_ff,
        "num_layers": num_layers, "num_decoder_layers": num_layers, "num_heads": num_heads,
        "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
        "layer_norm_epsilon": 1e-6, "initializer_factor": 1.0, "dropout_rate": 0.0,
        "pad_token_id": PAD_ID, "eos_token_id": EOS_ID, "decoder_start_token_id": PAD_ID,
        "is_encoder_decoder": True, "tie_word_embeddings": False, "use_cache": False, "dtype": "float32",
    }


def t5_weights(config: dict, seed: int) -> dict:
    """``T5EncoderModel`` tensors drawn as transformers' ``T5PreTrainedModel._init_weights`` does:
    embeddings N(0, 1), each projection N(0, fan_in ** -0.5) (queries also scaled by
    d_kv ** -0.5, T5's folded-in attention scaling), norms 1."""
    rng = np.random.default_rng(seed)
    d, dk, h, ff = config["d_model"], config["d_kv"], config["num_heads"], config["d_ff"]

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    tensors = {"shared.weight": normal((config["vocab_size"], d), 1.0)}
    for i in range(config["num_layers"]):
        p = f"encoder.block.{i}.layer"
        tensors[f"{p}.0.SelfAttention.q.weight"] = normal((h * dk, d), (d * dk) ** -0.5)
        tensors[f"{p}.0.SelfAttention.k.weight"] = normal((h * dk, d), d ** -0.5)
        tensors[f"{p}.0.SelfAttention.v.weight"] = normal((h * dk, d), d ** -0.5)
        tensors[f"{p}.0.SelfAttention.o.weight"] = normal((d, h * dk), (h * dk) ** -0.5)
        if i == 0:
            tensors[f"{p}.0.SelfAttention.relative_attention_bias.weight"] = normal(
                (config["relative_attention_num_buckets"], h), d ** -0.5)
        tensors[f"{p}.0.layer_norm.weight"] = np.ones(d, np.float32)
        tensors[f"{p}.1.DenseReluDense.wi_0.weight"] = normal((ff, d), d ** -0.5)
        tensors[f"{p}.1.DenseReluDense.wi_1.weight"] = normal((ff, d), d ** -0.5)
        tensors[f"{p}.1.DenseReluDense.wo.weight"] = normal((d, ff), ff ** -0.5)
        tensors[f"{p}.1.layer_norm.weight"] = np.ones(d, np.float32)
    tensors["encoder.final_layer_norm.weight"] = np.ones(d, np.float32)
    return tensors


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="models/pixart-digits",
                   help="model folder; tokenizer/ and text_encoder/ are written in it (default: models/pixart-digits)")
    p.add_argument("--d_model", type=int, default=64, help="hidden size (default: 64)")
    p.add_argument("--num_layers", type=int, default=2, help="encoder blocks (default: 2)")
    p.add_argument("--num_heads", type=int, default=4, help="attention heads (default: 4)")
    p.add_argument("--d_kv", type=int, default=16, help="size of one head (default: 16)")
    p.add_argument("--d_ff", type=int, default=128, help="feed-forward hidden size (default: 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the encoder's weights (default: 0)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    tokenizer = build_tokenizer()
    save_tokenizer(tokenizer, os.path.join(args.output_dir, "tokenizer"))
    config = t5_config(tokenizer.get_vocab_size(), args.d_model, args.num_layers, args.num_heads, args.d_kv, args.d_ff)
    folder = os.path.join(args.output_dir, "text_encoder")
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, "config.json"), config)
    save_file(t5_weights(config, args.seed), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    print(f"tokenizer: {config['vocab_size']} tokens -> {os.path.join(args.output_dir, 'tokenizer')}")
    print(f"T5 encoder: d_model {args.d_model}, {args.num_layers} layers, {args.num_heads} heads -> {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
