"""T5 v1.1 encoder: parity with transformers' T5EncoderModel, half precision without overflow, key coverage."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from tiny import randomize, t5_config
from transformers import T5Config, T5EncoderModel

from mlx_flash.t5 import RULES, T5_XXL, T5Encoder, load_t5, relative_position_buckets
from mlx_flash.t5 import T5Config as MLXT5Config
from mlx_flash.weights import WeightsError, check_weights, remap

VOCAB = 200


def relative_error(ours: mx.array, reference: torch.Tensor) -> float:
    reference = reference.detach().float().numpy()
    return float(np.abs(np.array(ours.astype(mx.float32)) - reference).max() / np.abs(reference).max())


def token_ids(length: int, seed: int = 0) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(3, VOCAB, size=(2, length))
    ids[0, length // 3] = 1  # end token, then padding: attended to (SD3 passes no mask)
    ids[0, length // 3 + 1:] = 0
    return ids


@pytest.fixture(scope="module")
def t5_pair(tmp_path_factory):
    """(transformers model, its folder), saved in several shards."""
    reference = randomize(T5EncoderModel(t5_config(VOCAB)), seed=3)
    folder = tmp_path_factory.mktemp("t5")
    reference.save_pretrained(folder, max_shard_size="100KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    return reference, folder


@pytest.mark.parametrize("length", [20, 300])  # 300 tokens reach the log-spaced buckets and beyond max_distance
def test_parity_with_transformers(t5_pair, length):
    reference, folder = t5_pair
    ids = token_ids(length)
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).last_hidden_state
    ours = load_t5(folder)(mx.array(ids))
    error = relative_error(ours, expected)
    print(f"\nT5 float32, {length} tokens: rel. error {error:.2e}")
    assert ours.shape == tuple(expected.shape) and error <= 1e-4


def test_half_precision_stays_finite(tmp_path):
    """FFN weights scaled so that block 0's FFN output and the residual stream exceed the float16 range."""
    reference = randomize(T5EncoderModel(t5_config(VOCAB)), seed=4)
    ffn = reference.encoder.block[0].layer[1].DenseReluDense
    with torch.no_grad():
        ffn.wi_1.weight.mul_(10)
        ffn.wo.weight.mul_(1e4)
    reference.save_pretrained(tmp_path)
    ids = token_ids(64, seed=1)
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).last_hidden_state

    # A naive float16 FFN (all in float16) overflows on block 0's FFN input.
    model = load_t5(tmp_path, dtype=mx.float32)
    block = model.blocks[0]
    bias = model.relative_attention_bias(relative_position_buckets(64, 32, 128)).transpose(2, 0, 1)[None]
    x = model.embed_tokens(mx.array(ids))
    x = x + block.attention(block.attention_norm(x), bias)
    h = block.ffn_norm(x).astype(mx.float16)
    w0, w1, wo = (w.astype(mx.float16) for w in (block.ffn.wi_0.weight, block.ffn.wi_1.weight, block.ffn.wo.weight))
    naive = (nn.gelu_approx(h @ w0.T) * (h @ w1.T)) @ wo.T
    print(f"\nT5 naive float16 FFN: {mx.isinf(naive).sum().item()} inf of {naive.size}")
    assert mx.isinf(naive).any().item()

    # bfloat16 keeps 8 mantissa bits: transformers' own bfloat16 T5 is ~4e-2 off here.
    for dtype, tolerance in ((mx.float16, 1e-2), (mx.bfloat16, 5e-2)):
        model = load_t5(tmp_path, dtype=dtype)
        assert model.blocks[0].ffn.wo.weight.dtype == (mx.float32 if dtype == mx.float16 else dtype)
        assert model.blocks[0].attention_norm.weight.dtype == mx.float32
        assert model.blocks[0].attention.q.weight.dtype == dtype
        ours = model(mx.array(ids))
        error = relative_error(ours, expected)
        print(f"T5 {dtype} (overflowing config): finite {mx.isfinite(ours).all().item()}, rel. error {error:.2e}")
        assert ours.dtype == dtype and mx.isfinite(ours).all().item() and error <= tolerance


def test_stored_half_weights_keep_wo_float32(tmp_path):
    """dtype=None keeps the stored precision, still with wo and norms in float32 for float16 weights."""
    randomize(T5EncoderModel(t5_config(VOCAB)), seed=5).half().save_pretrained(tmp_path)
    model = load_t5(tmp_path)
    assert model.embed_tokens.weight.dtype == mx.float16
    assert model.blocks[1].ffn.wo.weight.dtype == mx.float32 and model.final_layer_norm.weight.dtype == mx.float32


def test_full_size_keys_and_shapes():
    hf_config = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                         feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    assert MLXT5Config.from_dict(hf_config.to_dict()) == T5_XXL
    with torch.device("meta"):
        state = T5EncoderModel(hf_config).state_dict()
    mapped = remap({k: mx.zeros(tuple(v.shape)) for k, v in state.items()}, RULES)  # lazy: never evaluated
    model = T5Encoder(T5_XXL)
    assert set(mapped) == set(dict(tree_flatten(model.parameters())))
    check_weights(model, mapped, "T5")


def test_clear_errors(t5_pair, tmp_path):
    reference, _ = t5_pair
    state = {k: v for k, v in reference.state_dict().items() if k != "encoder.block.1.layer.1.DenseReluDense.wo.weight"}
    reference.save_pretrained(tmp_path, state_dict=state)
    with pytest.raises(WeightsError, match=r"1 missing \(blocks.1.ffn.wo.weight\)"):
        load_t5(tmp_path)
    state["encoder.final_layer_norm.weight"] = torch.ones(95)
    reference.save_pretrained(tmp_path, state_dict=state)
    with pytest.raises(WeightsError, match=r"final_layer_norm.weight \(95,\) != \(96,\)"):
        load_t5(tmp_path)
    with pytest.raises(ValueError, match="only T5 v1.1"):
        MLXT5Config.from_dict(T5Config(feed_forward_proj="relu").to_dict())
