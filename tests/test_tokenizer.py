"""Tokenization parity with transformers on the real T5 tokenizer (../shared/t5_tokenizer),
and prompt encoding end to end (plain and staged) against transformers' T5EncoderModel."""
import gc
import logging
import os
import weakref

import numpy as np
import pytest

from pixart.models import text_encoder as te
from pixart.models.t5 import T5Encoder
from pixart.errors import ModelLoadError
from tests.helpers_hf import assert_close, save_t5, t5_reference

TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir, "shared",
                         "t5_tokenizer")
LONG = "a majestic castle on a hill at sunset, " * 40
PROMPTS = ["a cat", "", "   \t\n ", "café, 東京, Привет", "A photo of an astronaut riding a horse.", LONG]


@pytest.fixture(scope="module")
def tokenizer():
    if not os.path.isdir(TOKENIZER):
        pytest.fail(f"the T5 tokenizer is missing (expected at {os.path.normpath(TOKENIZER)})")
    return te.load_tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def reference_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.mark.parametrize("max_length", [300, 120])
def test_ids_and_mask_equal_transformers(tokenizer, reference_tokenizer, max_length):
    ids, mask = te.tokenize(PROMPTS, tokenizer, max_length)
    expected = reference_tokenizer(PROMPTS, padding="max_length", max_length=max_length, truncation=True,
                                   add_special_tokens=True, return_tensors="np")
    assert ids.shape == mask.shape == (len(PROMPTS), max_length)
    assert ids.dtype == mask.dtype == np.int64
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])
    assert ids[1, 0] == 1 and mask[1].sum() == 1  # the empty prompt is just </s>
    np.testing.assert_array_equal(ids[2], ids[1])  # whitespace-only is empty too
    assert ids[-1, -1] == 1 and mask[-1].all()  # the truncated prompt still ends with </s>


def test_single_string(tokenizer):
    ids, mask = te.tokenize("a cat", tokenizer, 8)
    assert ids.tolist() == [[3, 9, 1712, 1, 0, 0, 0, 0]] and mask.tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]]


def test_truncation_warns_with_dropped_count(tokenizer, reference_tokenizer, caplog):
    full_length = len(reference_tokenizer(LONG)["input_ids"])
    assert full_length > 300
    with caplog.at_level(logging.WARNING, logger=te.__name__):
        te.tokenize(["a cat", LONG], tokenizer, 300)
    [record] = caplog.records
    assert (f"prompt 1 is {full_length} tokens long, the text encoder takes 300: "
            f"dropped the last {full_length - 300} token(s)") in record.getMessage()
    assert "castle" in record.getMessage()  # the dropped text is shown


def test_exact_fit_does_not_warn(tokenizer, reference_tokenizer, caplog):
    prompt = "a cat on a mat"
    length = len(reference_tokenizer(prompt)["input_ids"])
    with caplog.at_level(logging.WARNING, logger=te.__name__):
        _, mask = te.tokenize(prompt, tokenizer, length)
    assert mask.all() and not caplog.records


def test_bad_prompts(tokenizer):
    with pytest.raises(ValueError, match="non-empty list"):
        te.tokenize([], tokenizer, 8)
    with pytest.raises(ValueError, match="items of type int"):
        te.tokenize(["ok", 3], tokenizer, 8)


def test_tokenizer_folder_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        te.load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="neither tokenizer.json nor spiece.model"):
        te.load_tokenizer(str(tmp_path))


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5_vocab")
    reference = save_t5(folder, vocab_size=32128)  # the tokenizer's ids reach 32099
    return str(folder), reference


@pytest.mark.parametrize("max_length,encode_padding", [(24, False), (120, False), (120, True)])
def test_encode_prompts_matches_transformers(tokenizer, reference_tokenizer, t5_folder, max_length, encode_padding):
    """Every kept token's embedding is transformers'. By default a chunk of prompts is encoded
    over its unpadded length only (at 120 tokens: the first 64) and the padded positions are
    zero; ``encode_padding`` gives transformers' padded embeddings too."""
    folder, reference = t5_folder
    prompts = PROMPTS[:5]
    emb, mask = te.encode_prompts(prompts, tokenizer, T5Encoder.from_pretrained(folder), max_length, batch_size=2,
                                  encode_padding=encode_padding)
    enc = reference_tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                              add_special_tokens=True, return_tensors="np")
    assert emb.shape == (5, max_length, 32) and emb.dtype == np.float32
    np.testing.assert_array_equal(mask, enc["attention_mask"])
    expected = t5_reference(reference, enc["input_ids"], enc["attention_mask"])
    if encode_padding or max_length <= te.PADDING_STEP:
        assert_close(emb, expected)
    else:
        kept = mask.astype(bool)
        assert_close(emb[kept], expected[kept])
        np.testing.assert_array_equal(emb[:, te.PADDING_STEP:], 0.0)
        assert np.abs(expected[:, te.PADDING_STEP:]).max() > 0  # what was left out was not zero already


def kept_mask(*rows, tokens=300):
    """(len(rows), tokens) attention mask: row i keeps rows[i] leading tokens (an int) or exactly
    the token positions in rows[i] (a tuple)."""
    mask = np.zeros((len(rows), tokens), np.int64)
    for i, kept in enumerate(rows):
        mask[i, list(kept) if isinstance(kept, tuple) else slice(0, kept)] = 1
    return mask


def test_unpadded_length():
    """One past the last kept token of any row, up to a multiple of the step, at most the length;
    the whole length when a row keeps no token (it attends evenly to its padding)."""
    assert te.unpadded_length(kept_mask(1, 40)) == 64
    assert te.unpadded_length(kept_mask(64, 3)) == 64
    assert te.unpadded_length(kept_mask(65, 1)) == 128
    assert te.unpadded_length(kept_mask(1, 290)) == 300
    assert te.unpadded_length(kept_mask(1, (100,))) == 128  # a kept token after a gap counts
    assert te.unpadded_length(kept_mask(5, ())) == 300
    assert te.unpadded_length(kept_mask(1, 40)[:, :50]) == 50


def test_staged_encoding_returns_the_same_and_frees_the_encoder(tokenizer, t5_folder, monkeypatch):
    folder, _ = t5_folder
    expected, expected_mask = te.encode_prompts(PROMPTS[:3], tokenizer, T5Encoder.from_pretrained(folder), 16)
    built = []
    original = T5Encoder.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        model = original(cls, *args, **kwargs)
        built.append(weakref.ref(model))
        return model

    monkeypatch.setattr(T5Encoder, "from_pretrained", classmethod(spy))
    emb, mask = te.encode_prompts_staged(PROMPTS[:3], folder, TOKENIZER, 16)
    gc.collect()
    assert built and built[0]() is None, "the text encoder is still referenced after staged encoding"
    np.testing.assert_array_equal(emb, expected)
    np.testing.assert_array_equal(mask, expected_mask)
