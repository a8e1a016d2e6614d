"""T5 v1.1 encoder (T5-XXL in Stable Diffusion 3).

Half precision: the residual stream and the RMS norms stay in float32, the gated FFN product is formed in
float32, and in float16 the FFN output projection `wo` runs in float32 (as transformers keeps it): T5-XXL's
FFN outputs exceed the float16 range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .quantization import layer_by_layer
from .weights import (
    Rule,
    is_converted,
    load_into,
    quantize_like,
    read_component,
    remap,
    save_component,
)

# feed_forward_proj values meaning T5 v1.1's gated tanh-gelu FFN ("gated-gelu" is gelu_new in transformers).
GATED_TANH_GELU = ("gated-gelu", "gated-gelu_new", "gated-gelu_pytorch_tanh")

# transformers T5EncoderModel names -> ours.
RULES = [
    Rule(r"(shared|encoder\.embed_tokens)\.weight", "embed_tokens.weight"),
    Rule(r"encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
         "relative_attention_bias.weight"),
    Rule(r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.(.+)", r"blocks.\1.attention.\2"),
    Rule(r"encoder\.block\.(\d+)\.layer\.0\.layer_norm\.(.+)", r"blocks.\1.attention_norm.\2"),
    Rule(r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.(.+)", r"blocks.\1.ffn.\2"),
    Rule(r"encoder\.block\.(\d+)\.layer\.1\.layer_norm\.(.+)", r"blocks.\1.ffn_norm.\2"),
    Rule(r"encoder\.final_layer_norm\.(.+)", r"final_layer_norm.\1"),
]


@dataclass(frozen=True)
class T5Config:
    """T5 v1.1 encoder sizes; preset `T5_XXL`, or `from_dict(config.json)`."""

    vocab_size: int
    d_model: int
    d_kv: int
    num_heads: int
    d_ff: int
    num_layers: int
    num_buckets: int = 32
    max_distance: int = 128
    layer_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, config: dict) -> T5Config:
        """From a transformers `T5Config` config.json (T5 v1.1: gated tanh-gelu FFN)."""
        required = ["vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "num_layers"]
        missing = [key for key in required if key not in config]
        if missing:
            raise ValueError(f"T5 config.json lacks {missing}; expected a transformers T5Config.")
        ffn = config.get("feed_forward_proj", "relu")
        if ffn not in GATED_TANH_GELU:
            raise ValueError(f"T5 feed_forward_proj {ffn!r} is not supported; only T5 v1.1 ('gated-gelu') is.")
        return cls(
            **{key: config[key] for key in required},
            num_buckets=config.get("relative_attention_num_buckets", 32),
            max_distance=config.get("relative_attention_max_distance", 128),
            layer_norm_eps=config.get("layer_norm_epsilon", 1e-6),
        )

    def to_dict(self) -> dict:
        """The transformers `T5Config` config.json fields `from_dict` reads."""
        return {
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "d_kv": self.d_kv,
            "num_heads": self.num_heads,
            "d_ff": self.d_ff,
            "num_layers": self.num_layers,
            "feed_forward_proj": "gated-gelu",
            "relative_attention_num_buckets": self.num_buckets,
            "relative_attention_max_distance": self.max_distance,
            "layer_norm_epsilon": self.layer_norm_eps,
        }


T5_XXL = T5Config(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> mx.array:
    """Bidirectional relative position bucket of (query i, key j) for a sequence of `length` tokens.

    Half the buckets of each direction are exact distances, the rest log-spaced up to `max_distance`.
    Computed in numpy float32, so the bucket edges are the same on every backend.
    """
    relative = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    exact = half // 2
    distance = np.abs(relative)
    with np.errstate(divide="ignore"):
        log_ratio = np.log(distance.astype(np.float32) / exact) / math.log(max_distance / exact)
    far = exact + (log_ratio * (half - exact)).clip(0, half).astype(np.int64)
    bucket = np.where(distance < exact, distance, np.minimum(far, half - 1))
    return mx.array((relative > 0) * half + bucket)


class Attention(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.num_heads = config.num_heads
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)

    def __call__(self, x: mx.array, position_bias: mx.array) -> mx.array:
        B, L, _ = x.shape
        q, k, v = (p(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3) for p in (self.q, self.k, self.v))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=position_bias)  # T5: no 1/sqrt(d)
        return self.o(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class FeedForward(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gated = nn.gelu_approx(self.wi_0(x).astype(mx.float32)) * self.wi_1(x).astype(mx.float32)
        dtype = self.wo["scales"].dtype if "scales" in self.wo else self.wo.weight.dtype  # quantized or not
        return self.wo(gated.astype(dtype))


class Block(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_eps)
        self.ffn = FeedForward(config)

    def __call__(self, x: mx.array, position_bias: mx.array) -> mx.array:
        dtype = position_bias.dtype  # the compute dtype; x, the residual stream, is float32
        x = x + self.attention(self.attention_norm(x).astype(dtype), position_bias)
        return x + self.ffn(self.ffn_norm(x).astype(dtype))


class T5Encoder(nn.Module):
    """The T5 v1.1 encoder stack (transformers' `T5EncoderModel`)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.relative_attention_bias = nn.Embedding(config.num_buckets, config.num_heads)
        self.blocks = [Block(config) for _ in range(config.num_layers)]
        self.final_layer_norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_eps)

    @layer_by_layer()
    def __call__(self, input_ids: mx.array) -> mx.array:
        """Token ids (B, L) -> last hidden state (B, L, d_model) in the weights' dtype."""
        dtype = self.embed_tokens.weight.dtype
        buckets = relative_position_buckets(input_ids.shape[-1], self.config.num_buckets, self.config.max_distance)
        position_bias = self.relative_attention_bias(buckets).transpose(2, 0, 1)[None].astype(dtype)  # shared
        x = self.embed_tokens(input_ids).astype(mx.float32)
        for block in self.blocks:
            x = block(x, position_bias)
        return self.final_layer_norm(x).astype(dtype)


def keeps_float32(key: str, dtype: mx.Dtype | None) -> bool:
    """Tensors T5 keeps in float32 to stay finite: its norms, and in float16 the FFN output projection."""
    return key.endswith("norm.weight") or (dtype == mx.float16 and ".ffn.wo." in key)


def t5_from_weights(
    config: Mapping, weights: Mapping[str, mx.array], dtype: mx.Dtype | None = None, name: str = "T5 encoder"
) -> T5Encoder:
    """Build a T5 encoder from a config.json dictionary and its tensors: transformers names, or the
    mlx-flash layout (converted, possibly quantized) when the config says so.

    `dtype` None keeps the stored precision. Norm weights stay float32; in float16 so does `wo` (its
    scales and biases when quantized).
    """
    model = T5Encoder(T5Config.from_dict(config))
    if is_converted(config):
        quantize_like(model, weights, config.get("quantization"))
    else:
        weights = remap(weights, RULES)
    if dtype is None and "embed_tokens.weight" in weights:
        dtype = weights["embed_tokens.weight"].dtype

    return load_into(model, weights, name, dtype=dtype, keep_float32=lambda key: keeps_float32(key, dtype))


def load_t5(folder: str | Path, dtype: mx.Dtype | None = None) -> T5Encoder:
    """Load a text_encoder_3/ folder: diffusers layout (transformers T5EncoderModel, one or many shards) or
    mlx-flash layout. See `t5_from_weights` for `dtype`."""
    config, weights = read_component(folder)
    return t5_from_weights(config, weights, dtype, f"T5 encoder ({folder})")


def save_t5(folder: str | Path, model: T5Encoder, quantization: Mapping | None = None) -> None:
    """Write the encoder as an mlx-flash layout folder."""
    save_component(folder, model, model.config.to_dict(), quantization)
