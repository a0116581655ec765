"""The attention kernels on CPU: the flash path (through a stand-in for MindSpore's
``flash_attention_score`` written from its documentation, as no NPU is here), head-size padding,
query chunking, and the choice of kernel per device and dtype."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, ops

from pixart.errors import ConfigError
from pixart.models import attention as attention_module
from pixart.models.attention import choose_attention, flash_attention, math_attention
from pixart.models.pixart import Conditioning, Kernels, PixArtConfig, build_model


def documented_flash_attention_score(query, key, value, head_num, real_shift=None, drop_mask=None,
                                     padding_mask=None, attn_mask=None, prefix=None, actual_seq_qlen=None,
                                     actual_seq_kvlen=None, keep_prob=1.0, scalar_value=1.0,
                                     pre_tokens=2147483647, next_tokens=2147483647, inner_precise=0,
                                     input_layout="BSH", sparse_mode=0):
    """``ops.flash_attention_score`` as MindSpore documents it, in NumPy: Softmax(Mask(scale * q k^T),
    attn_mask) v, attn_mask 1 (True) where a key is discarded, head size D a multiple of 16 up to
    512. Only the BNSD layout and what PixArt passes are implemented; the rest must stay default."""
    assert input_layout == "BNSD", input_layout
    q, k, v = (t.asnumpy().astype(np.float64) for t in (query, key, value))
    b, n, s1, d = q.shape
    assert head_num == n and d % 16 == 0 and d <= 512, (head_num, q.shape)
    assert k.shape == v.shape and k.shape[:2] == (b, n) and k.shape[3] == d
    assert (real_shift, drop_mask, padding_mask, prefix, keep_prob, sparse_mode) == (None, None, None, None, 1.0, 0)
    scores = scalar_value * q @ k.swapaxes(-1, -2)
    if attn_mask is not None:
        assert attn_mask.dtype in (ms.uint8, ms.bool_) and attn_mask.shape in ((b, 1, s1, k.shape[2]),
                                                                              (b, n, s1, k.shape[2]))
        scores = np.where(attn_mask.asnumpy().astype(bool), -np.inf, scores)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    documented_flash_attention_score.head_sizes.append(d)
    return Tensor((probs @ v).astype(np.float32)).astype(query.dtype)


@pytest.fixture
def fake_flash(monkeypatch):
    documented_flash_attention_score.head_sizes = []
    monkeypatch.setattr(ops, "flash_attention_score", documented_flash_attention_score, raising=False)
    return documented_flash_attention_score


def random_qkv(seed=0, b=2, heads=3, nq=40, nk=24, d=72):
    rng = np.random.default_rng(seed)
    return [Tensor(rng.standard_normal(shape).astype(np.float32))
            for shape in ((b, heads, nq, d), (b, heads, nk, d), (b, heads, nk, d))]


def caption_bias(b=2, nk=24, kept=(24, 7)):
    bias = np.zeros((b, 1, 1, nk), np.float32)
    for row, count in enumerate(kept):
        bias[row, ..., count:] = -10000.0
    return Tensor(bias)


def test_flash_path_pads_the_head_size_and_equals_math_attention(fake_flash):
    q, k, v = random_qkv(d=72)
    bias = caption_bias()
    flash = flash_attention(q, k, v, bias)
    assert fake_flash.head_sizes == [80]  # PixArt-XL's 72 padded to a multiple of 16
    assert flash.shape == q.shape
    np.testing.assert_allclose(flash.asnumpy(), math_attention(q, k, v, bias).asnumpy(), rtol=1e-5, atol=1e-5)
    unpadded = random_qkv(d=64)
    np.testing.assert_allclose(flash_attention(*unpadded).asnumpy(), math_attention(*unpadded).asnumpy(),
                               rtol=1e-5, atol=1e-5)
    assert fake_flash.head_sizes == [80, 64]


def test_chunked_math_attention_equals_one_block():
    q, k, v = random_qkv(nq=50)
    bias = caption_bias()
    whole = math_attention(q, k, v, bias, budget=1 << 30).asnumpy()
    for budget in (2 * 3 * 24 * 7, 2 * 3 * 24, 1):  # 7 queries a chunk (uneven last chunk), 1, and below one row
        # a chunk's matmuls may block their sums differently (AVX2 CPUs: a few ulps, 6e-7 measured)
        np.testing.assert_allclose(math_attention(q, k, v, bias, budget=budget).asnumpy(), whole,
                                   rtol=1e-6, atol=2e-6)


XL_HEADS = PixArtConfig(input_size=8, depth=2, hidden_size=144, num_heads=2, caption_channels=32,
                        model_max_length=6)  # head size 72, as PixArt-XL


def random_model(kernels, seed=0):
    model = build_model(XL_HEADS, kernels=kernels)
    rng = np.random.default_rng(seed)
    for p in model.get_parameters():  # zero-initialised projections too, so every path counts
        p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.05))
    model.set_train(False)
    return model


def model_inputs():
    rng = np.random.default_rng(1)
    x = Tensor(rng.standard_normal((2, 4, 8, 8)).astype(np.float32))
    mask = np.ones((2, 6), np.int64)
    mask[1, 3:] = 0  # padded caption tokens: the flash mask must drop exactly these
    cond = Conditioning.of(rng.standard_normal((2, 6, 32)).astype(np.float32), mask)
    return x, Tensor(np.array([10.0, 700.0], np.float32)), cond


def test_flash_pixart_block_equals_math(fake_flash):
    math_out = random_model(Kernels(attention="math"))(*model_inputs()).asnumpy()
    flash_out = random_model(Kernels(attention="flash"))(*model_inputs()).asnumpy()
    assert fake_flash.head_sizes == [80] * 4  # self- and cross-attention of both blocks
    np.testing.assert_allclose(flash_out, math_out, rtol=1e-5, atol=1e-5)


def test_pixart_attention_chunks_beyond_the_budget(monkeypatch):
    softmax_calls = []
    softmax = ops.softmax
    monkeypatch.setattr(ops, "softmax", lambda *a, **k: softmax_calls.append(1) or softmax(*a, **k))
    whole = random_model(Kernels())(*model_inputs()).asnumpy()
    assert len(softmax_calls) == 4  # one score block per attention
    monkeypatch.setattr(attention_module, "SCORES_BUDGET", 2 * 2 * 16 * 5)  # 5 of the 16 queries a chunk
    chunked = random_model(Kernels())(*model_inputs()).asnumpy()
    assert len(softmax_calls) == 4 + 2 * (4 + 2)  # self-attention in 4 chunks, cross-attention (6 keys) in 2
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)


def test_attention_kernel_per_device_and_dtype(monkeypatch):
    assert attention_module.ascend_soc() == ""  # no NPU here
    monkeypatch.setattr(ops, "flash_attention_score", documented_flash_attention_score, raising=False)
    monkeypatch.setattr(attention_module, "ascend_soc", lambda: "ascend910b")
    assert choose_attention("auto", "Ascend", ms.float16) == "flash"
    assert choose_attention("auto", "Ascend", ms.bfloat16) == "flash"
    assert choose_attention("math", "Ascend", ms.float16) == "math"
    for device, dtype in (("Ascend", ms.float32), ("GPU", ms.float16), ("CPU", ms.float32)):
        assert choose_attention("auto", device, dtype) == "math"
        with pytest.raises(ConfigError, match="--attention flash cannot run here"):
            choose_attention("flash", device, dtype)
    monkeypatch.setattr(attention_module, "ascend_soc", lambda: "ascend910")  # 910A: no flash kernel
    assert choose_attention("auto", "Ascend", ms.float16) == "math"
    with pytest.raises(ConfigError, match="Atlas A2/A3.*ascend910$"):
        choose_attention("flash", "Ascend", ms.float16)
    monkeypatch.delattr(ops, "flash_attention_score")
    monkeypatch.setattr(attention_module, "ascend_soc", lambda: "ascend910b")
    with pytest.raises(ConfigError, match="no flash_attention_score"):
        choose_attention("flash", "Ascend", ms.float16)
    with pytest.raises(ConfigError, match="--attention must be one of"):
        choose_attention("fast", "CPU", ms.float32)
