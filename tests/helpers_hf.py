"""Tiny Hugging Face reference models (random weights) saved as real folders, and the
tolerance check, for the T5, tokenizer and VAE parity tests."""
import numpy as np
import torch

TOL = 1e-4  # max |ours - reference| relative to max |reference| (at least 1)


def assert_close(ours, reference, tol=TOL):
    """Return the max abs difference after asserting it is within ``tol`` x the output scale."""
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape, f"shape {ours.shape} != reference {reference.shape}"
    scale = max(1.0, float(np.abs(reference).max()))
    err = float(np.abs(ours - reference).max())
    assert err <= tol * scale, f"max abs diff {err:.3g} > {tol} x {scale:.3g}"
    return err


def run_cell(model, x, t, cond, mode="pynative"):
    """model(x, t, cond) as NumPy: eagerly, compiled whole (``graph``, the conditioning splatted at
    the jit boundary) or one compiled block at a time (``streamed``)."""
    import mindspore as ms

    from pixart.models.pixart import BlockStreamedForward

    x, t = ms.Tensor(x), ms.Tensor(t)
    if mode == "graph":
        @ms.jit
        def forward(x, t, *fields):
            return model(x, t, fields)
        return forward(x, t, *cond).asnumpy()
    if mode == "streamed":
        return BlockStreamedForward(model)(x, t, cond).asnumpy()
    return model(x, t, cond).asnumpy()


T5_TINY = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
               feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
               relative_attention_max_distance=20)


def make_t5(seed=0, **overrides):
    """A transformers ``T5EncoderModel`` with random weights, in eval mode (no dropout)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(**{**T5_TINY, **overrides})).eval()


def save_t5(folder, seed=0, max_shard_size=None, torch_dtype=None, **overrides):
    """Save a random tiny T5 encoder to ``folder``; return the fp32 reference model whose
    weights equal what was saved (rounded through ``torch_dtype`` when given)."""
    model = make_t5(seed, **overrides)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), **kwargs)
    return model.float().eval()


def t5_reference(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
