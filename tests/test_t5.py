"""Parity of our T5 encoder with transformers' ``T5EncoderModel``, through saved folders.

Each test saves a tiny random T5 with ``save_pretrained`` (sharded, or in bf16/fp16) and loads
it with ``T5Encoder.from_pretrained``. fp32 tolerance: max |ours - reference| <= 1e-4 x
max(1, max |reference|); the measured differences are about 2e-6.
"""
import json
import os

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import Tensor

from pixart.models.t5 import T5Encoder, relative_distance_buckets
from pixart.errors import ModelLoadError
from pixart.utils.safetensors_io import load_sharded_folder, read_header, save_file
from tests.helpers_hf import assert_close, save_t5, t5_reference

ms.set_context(mode=ms.PYNATIVE_MODE)
ms.set_device("CPU")


def batch(length=40, vocab=128, pad_from=(None, 13), seed=0):
    """(B, L) ids and a padding mask: row b keeps tokens [0, pad_from[b])."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (len(pad_from), length))
    mask = np.ones_like(ids)
    for row, start in enumerate(pad_from):
        if start is not None:
            ids[row, start:] = 0
            mask[row, start:] = 0
    return ids, mask


def run(model, ids, mask):
    return model(Tensor(ids.astype(np.int32)), Tensor(mask)).asnumpy()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5_sharded")
    reference = save_t5(folder, max_shard_size="20KB")
    return folder, reference


def test_sharded_checkpoint_parity_with_padding(sharded):
    folder, reference = sharded
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) >= 2
    model = T5Encoder.from_pretrained(str(folder))
    ids, mask = batch(length=40, pad_from=(None, 13, 1))  # longer than max_distance 20: log and capped buckets
    assert_close(run(model, ids, mask), t5_reference(reference, ids, mask))


def test_pixart_sigma_length_default_buckets(tmp_path):
    reference = save_t5(tmp_path, relative_attention_num_buckets=32, relative_attention_max_distance=128)
    model = T5Encoder.from_pretrained(str(tmp_path))
    ids, mask = batch(length=300, pad_from=(7, 250))
    out = run(model, ids, mask)
    assert out.shape == (2, 300, 32) and out.dtype == np.float32
    assert_close(out, t5_reference(reference, ids, mask))


@pytest.mark.parametrize("torch_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_loads_into_fp32(tmp_path, torch_dtype):
    reference = save_t5(tmp_path, torch_dtype=torch_dtype)
    on_disk = {v["dtype"] for v in read_header(str(tmp_path / "model.safetensors")).values()}
    assert on_disk == {"BF16" if torch_dtype == torch.bfloat16 else "F16"}
    model = T5Encoder.from_pretrained(str(tmp_path))
    ids, mask = batch()
    assert_close(run(model, ids, mask), t5_reference(reference, ids, mask))


def test_relu_feed_forward(tmp_path):
    reference = save_t5(tmp_path, feed_forward_proj="relu")
    model = T5Encoder.from_pretrained(str(tmp_path))
    assert "encoder.block.0.layer.1.DenseReluDense.wi.weight" in dict(model.parameters_and_names())
    ids, mask = batch()
    assert_close(run(model, ids, mask), t5_reference(reference, ids, mask))


def test_graph_mode_matches(sharded):
    folder, reference = sharded
    model = T5Encoder.from_pretrained(str(folder))
    ids, mask = batch()

    @ms.jit
    def forward(i, m):
        return model(i, m)

    assert_close(forward(Tensor(ids.astype(np.int32)), Tensor(mask)).asnumpy(), t5_reference(reference, ids, mask))


def test_bucket_table_equals_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = torch.arange(-3000, 3001)
    for num_buckets, max_distance in [(32, 128), (8, 20), (64, 256), (16, 100), (128, 1000)]:
        expected = T5Attention._relative_position_bucket(relative, True, num_buckets, max_distance).numpy()
        table = relative_distance_buckets(num_buckets, max_distance)
        ours = (relative.numpy() > 0) * (num_buckets // 2) + table[np.minimum(np.abs(relative.numpy()), max_distance)]
        np.testing.assert_array_equal(ours, expected)


def test_old_export_with_embed_tokens_only(tmp_path):
    reference = save_t5(tmp_path / "hf")
    tensors = load_sharded_folder(str(tmp_path / "hf"))
    tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
    os.makedirs(tmp_path / "old")
    save_file(tensors, str(tmp_path / "old" / "model.safetensors"))
    (tmp_path / "old" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    ids, mask = batch()
    assert_close(run(T5Encoder.from_pretrained(str(tmp_path / "old")), ids, mask), t5_reference(reference, ids, mask))


# --- reduced precision: run on CPU where MindSpore can (fp16), check placement for bf16 ---

def test_fp16_keeps_wo_and_norms_in_fp32_and_stays_close(sharded):
    folder, reference = sharded
    model = T5Encoder.from_pretrained(str(folder), dtype=ms.float16)
    params = dict(model.parameters_and_names())
    assert params["encoder.block.0.layer.0.SelfAttention.q.weight"].dtype == ms.float16
    assert params["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].dtype == ms.float16
    assert params["encoder.block.0.layer.1.DenseReluDense.wo.weight"].dtype == ms.float32
    assert params["encoder.final_layer_norm.weight"].dtype == ms.float32
    ids, mask = batch()
    out = run(model, ids, mask)
    assert out.dtype == np.float32
    assert_close(out, t5_reference(reference, ids, mask), tol=5e-3)


def test_fp16_overflow_is_clamped_not_inf(sharded):
    folder, _ = sharded
    model = T5Encoder.from_pretrained(str(folder), dtype=ms.float16)
    wi_1 = model.encoder.block[0].layer[1].DenseReluDense.wi_1.weight
    wi_1.set_data(Tensor(wi_1.asnumpy() * 1e5))  # its outputs now exceed the fp16 range
    ids, mask = batch()
    out = run(model, ids, mask)
    assert np.isfinite(out).all()


def test_bf16_weights_are_bf16(sharded):
    folder, _ = sharded
    model = T5Encoder.from_pretrained(str(folder), dtype=ms.bfloat16)
    params = dict(model.parameters_and_names())
    assert params["encoder.block.1.layer.1.DenseReluDense.wo.weight"].dtype == ms.bfloat16
    assert params["shared.weight"].dtype == ms.float32
    # CPU MindSpore has no bf16 matmul; compare the stored values with the checkpoint instead
    expected = load_sharded_folder(str(folder))["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    stored = params["encoder.block.1.layer.1.DenseReluDense.wo.weight"].astype(ms.float32).asnumpy()
    assert_close(stored, expected, tol=1e-2)


# --- errors: one exception type, a message that says what and where ---

def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        T5Encoder.from_pretrained(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        T5Encoder.from_pretrained(str(tmp_path))


def test_missing_shard(tmp_path):
    save_t5(tmp_path, max_shard_size="20KB")
    shard = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[-1]
    os.remove(tmp_path / shard)
    with pytest.raises(ModelLoadError, match=f"missing: {shard}"):
        T5Encoder.from_pretrained(str(tmp_path))


def test_no_weights(tmp_path):
    save_t5(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="expected model.safetensors"):
        T5Encoder.from_pretrained(str(tmp_path))


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del config[key]
    path.write_text(json.dumps(config))


def test_config_d_model_does_not_match_weights(tmp_path):
    save_t5(tmp_path)
    edit_config(tmp_path, d_model=64)
    expected = r"has shape \(\d+, 32\) in the weights but \(\d+, 64\) in the model built from config.json"
    with pytest.raises(ModelLoadError, match=expected):
        T5Encoder.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("num_layers, message", [(1, "the model does not have"), (3, "missing 9 tensor")])
def test_config_num_layers_does_not_match_weights(tmp_path, num_layers, message):
    save_t5(tmp_path)
    edit_config(tmp_path, num_layers=num_layers)
    with pytest.raises(ModelLoadError, match=message):
        T5Encoder.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("changes, message", [({"d_model": None}, "missing keys d_model"),
                                              ({"feed_forward_proj": "gated-swish"}, "not supported")])
def test_bad_config(tmp_path, changes, message):
    save_t5(tmp_path)
    edit_config(tmp_path, **changes)
    with pytest.raises(ModelLoadError, match=message):
        T5Encoder.from_pretrained(str(tmp_path))
