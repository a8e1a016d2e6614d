"""CLIP text encoder: OpenAI CLIP-L/14 and OpenCLIP bigG/14, as Stable Diffusion 3 uses them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import mlx.core as mx
import mlx.nn as nn

from .weights import (
    Rule,
    is_converted,
    load_into,
    quantize_like,
    read_component,
    remap,
    save_component,
)

ACTIVATIONS = {"quick_gelu": nn.gelu_fast_approx, "gelu": nn.gelu}  # gelu_fast_approx is x * sigmoid(1.702 x)

# transformers CLIPTextModelWithProjection (or bare CLIPTextModel) names -> ours, which are flat.
RULES = [
    Rule(r"(?:text_model\.)?embeddings\.(.+)", r"\1"),
    Rule(r"(?:text_model\.)?encoder\.(.+)", r"\1"),
    Rule(r"text_model\.(.+)", r"\1"),
]


@dataclass(frozen=True)
class CLIPConfig:
    """CLIP text transformer sizes; presets `CLIP_L` and `CLIP_G`, or `from_dict(config.json)`."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    projection_dim: int
    hidden_act: str
    vocab_size: int = 49408
    max_positions: int = 77
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407  # 2 in old configs: the pooled token is then the one with the highest id

    @classmethod
    def from_dict(cls, config: dict) -> CLIPConfig:
        """From a transformers `CLIPTextConfig` config.json."""
        required = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"]
        missing = [key for key in required if key not in config]
        if missing:
            raise ValueError(f"CLIP config.json lacks {missing}; expected a transformers CLIPTextConfig.")
        act = config.get("hidden_act", "quick_gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"CLIP hidden_act {act!r} is not supported; expected one of {sorted(ACTIVATIONS)}.")
        return cls(
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            intermediate_size=config["intermediate_size"],
            projection_dim=config.get("projection_dim") or config["hidden_size"],
            hidden_act=act,
            vocab_size=config.get("vocab_size", 49408),
            max_positions=config.get("max_position_embeddings", 77),
            layer_norm_eps=config.get("layer_norm_eps", 1e-5),
            eos_token_id=config.get("eos_token_id", 49407),
        )

    def to_dict(self) -> dict:
        """The transformers `CLIPTextConfig` config.json fields `from_dict` reads."""
        return {
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "projection_dim": self.projection_dim,
            "hidden_act": self.hidden_act,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_positions,
            "layer_norm_eps": self.layer_norm_eps,
            "eos_token_id": self.eos_token_id,
        }


CLIP_L = CLIPConfig(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, projection_dim=768,
                    hidden_act="quick_gelu")
CLIP_G = CLIPConfig(hidden_size=1280, num_layers=32, num_heads=20, intermediate_size=5120, projection_dim=1280,
                    hidden_act="gelu")


class Attention(nn.Module):
    def __init__(self, dims: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dims, dims)
        self.k_proj = nn.Linear(dims, dims)
        self.v_proj = nn.Linear(dims, dims)
        self.out_proj = nn.Linear(dims, dims)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, _ = x.shape
        q, k, v = (p(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, mask="causal")
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config.hidden_size, config.num_heads)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(nn.Module):
    """CLIP text transformer with its projection head (transformers' `CLIPTextModelWithProjection`)."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_positions, config.hidden_size)
        self.layers = [EncoderLayer(config) for _ in range(config.num_layers)]
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def __call__(self, input_ids: mx.array, clip_skip: int | None = None) -> tuple[mx.array, mx.array]:
        """Token ids (B, L) -> (per-token embeddings (B, L, hidden), pooled projection (B, projection_dim)).

        The per-token embeddings are the hidden states `clip_skip` layers before the penultimate layer's
        output (transformers' `hidden_states[-(clip_skip + 2)]`; None means 0). The pooled output is the
        projected final-norm state of the first end token.
        """
        n = self.config.num_layers
        skip = clip_skip or 0
        if not 0 <= skip < n:
            raise ValueError(f"clip_skip={clip_skip} is out of range for a {n}-layer CLIP; use 0 to {n - 1} or None.")
        L = input_ids.shape[-1]
        if L > self.config.max_positions:
            raise ValueError(f"CLIP takes at most {self.config.max_positions} tokens, got {L}; truncate the prompt.")

        x = self.token_embedding(input_ids) + self.position_embedding.weight[:L]
        states = [x]
        for layer in self.layers:
            x = layer(x)
            states.append(x)

        end = input_ids.max(axis=-1, keepdims=True) if self.config.eos_token_id == 2 else self.config.eos_token_id
        first_end = mx.argmax((input_ids == end) * (L - mx.arange(L)), axis=-1)
        pooled = self.final_layer_norm(x[mx.arange(x.shape[0]), first_end])
        return states[-(skip + 2)], self.text_projection(pooled)


def clip_from_weights(
    config: Mapping, weights: Mapping[str, mx.array], dtype: mx.Dtype | None = None, name: str = "CLIP text encoder"
) -> CLIPTextModel:
    """Build a CLIP text encoder from a config.json dictionary and its tensors: transformers names, or the
    mlx-flash layout (converted, possibly quantized) when the config says so.

    A missing text_projection (checkpoints of the bare text model) is set to the identity.
    """
    model = CLIPTextModel(CLIPConfig.from_dict(config))
    if is_converted(config):
        quantize_like(model, weights, config.get("quantization"))
        return load_into(model, weights, name, dtype=dtype)
    weights = remap({k: v for k, v in weights.items() if not k.endswith("position_ids")}, RULES)
    if "text_projection.weight" not in weights:
        stored_dtype = next(iter(weights.values())).dtype
        weights["text_projection.weight"] = mx.eye(model.config.hidden_size, dtype=stored_dtype)
    return load_into(model, weights, name, dtype=dtype)


def load_clip(folder: str | Path, dtype: mx.Dtype | None = None) -> CLIPTextModel:
    """Load a text_encoder/ or text_encoder_2/ folder: diffusers layout (transformers
    CLIPTextModelWithProjection) or mlx-flash layout."""
    config, weights = read_component(folder)
    return clip_from_weights(config, weights, dtype, f"CLIP text encoder ({folder})")


def save_clip(folder: str | Path, model: CLIPTextModel, quantization: Mapping | None = None) -> None:
    """Write the encoder as an mlx-flash layout folder."""
    save_component(folder, model, model.config.to_dict(), quantization)
