"""Stability's single-file checkpoints (sd3.5_large.safetensors, sd3_medium_incl_clips_t5xxlfp16.safetensors,
...) and separate encoder files (clip_l / clip_g / t5xxl_fp16.safetensors) as diffusers-layout components.

Each component comes back as `(config, tensors)` exactly as `read_component` reads it from a diffusers
folder: diffusers / transformers tensor names and layouts, and a config.json-like dictionary inferred from
the tensor names and shapes. Tensors stay lazy (`mx.load`), so callers can stream them one by one.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterable, Mapping

import mlx.core as mx

from .mmdit import MMDiTConfig
from .weights import Rule, WeightsError, load_safetensors, refuse_pickle, remap

# Component (diffusers pipeline folder name) -> its key prefix in a single-file checkpoint.
PREFIXES = {
    "transformer": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.clip_g.transformer.",
    "text_encoder_3": "text_encoders.t5xxl.transformer.",
}
ENCODER_KINDS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"}
CLIP_HEAD_DIM = 64  # CLIP-L/14 (768 = 12 x 64) and OpenCLIP bigG/14 (1280 = 20 x 64)


@dataclass(frozen=True)
class Split:
    """Cut tensors whose key fully matches `source` into len(`targets`) equal chunks along axis 0, named by
    the `targets` templates in order: e.g. a fused qkv projection into separate q, k, v projections."""

    source: str
    targets: tuple[str, ...]


def map_tensors(weights: Mapping[str, mx.array], rules: Iterable[Rule | Split]) -> dict[str, mx.array]:
    """Apply `Split`s, then `Rule`s (see `remap`); unmatched keys pass unchanged. All ops are lazy."""
    rules = list(rules)
    splits = [(re.compile(s.source), s) for s in rules if isinstance(s, Split)]
    out: dict[str, mx.array] = {}
    for key, value in weights.items():
        match = next(((p, s) for p, s in splits if p.fullmatch(key)), None)
        if match is None:
            out[key] = value
            continue
        pattern, split = match
        parts = mx.split(value, len(split.targets), axis=0)
        out.update({pattern.sub(target, key): part for target, part in zip(split.targets, parts)})
    return remap(out, [r for r in rules if isinstance(r, Rule)])


def swap_halves(w: mx.array) -> mx.array:
    """Original AdaLayerNormContinuous chunks (shift, scale); diffusers chunks (scale, shift)."""
    shift, scale = mx.split(w, 2, axis=0)
    return mx.concatenate([scale, shift], axis=0)


def conv1x1_to_linear(w: mx.array) -> mx.array:
    return w.reshape(w.shape[:2]) if w.ndim == 4 else w


def _count(weights: Iterable[str], pattern: str) -> int:
    """1 + the largest index captured by `pattern` (matched at the start of the keys), or 0."""
    return 1 + max((int(m.group(1)) for k in weights if (m := re.match(pattern, k))), default=-1)


def _shape(weights: Mapping[str, mx.array], key: str, component: str) -> tuple[int, ...]:
    if key not in weights:
        raise WeightsError(f"{component}: cannot infer the model configuration, tensor {key} is missing; "
                           "is the checkpoint complete and of the SD3 family?")
    return tuple(weights[key].shape)


# Transformer ----------------------------------------------------------------------------------------------

TOP_LEVEL = [  # (original module, diffusers module)
    ("x_embedder.proj", "pos_embed.proj"),
    ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    ("context_embedder", "context_embedder"),
    ("final_layer.linear", "proj_out"),
]
BLOCK = [  # (original module in joint_blocks.i, diffusers module in transformer_blocks.i)
    ("x_block.attn.proj", "attn.to_out.0"),
    ("x_block.attn.ln_q", "attn.norm_q"),
    ("x_block.attn.ln_k", "attn.norm_k"),
    ("x_block.attn2.proj", "attn2.to_out.0"),
    ("x_block.attn2.ln_q", "attn2.norm_q"),
    ("x_block.attn2.ln_k", "attn2.norm_k"),
    ("x_block.adaLN_modulation.1", "norm1.linear"),
    ("x_block.mlp.fc1", "ff.net.0.proj"),
    ("x_block.mlp.fc2", "ff.net.2"),
    ("context_block.attn.proj", "attn.to_add_out"),
    ("context_block.attn.ln_q", "attn.norm_added_q"),
    ("context_block.attn.ln_k", "attn.norm_added_k"),
    ("context_block.adaLN_modulation.1", "norm1_context.linear"),
    ("context_block.mlp.fc1", "ff_context.net.0.proj"),
    ("context_block.mlp.fc2", "ff_context.net.2"),
]
FINAL_ADALN = ("final_layer.adaLN_modulation.1", "norm_out.linear")  # its shift and scale halves swap
BLOCK_QKV = [  # fused original projection -> diffusers q, k, v
    ("x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v")),
]


def transformer_rules(num_layers: int) -> list[Rule | Split]:
    """Original MMDiT names -> diffusers `SD3Transformer2DModel` names. The final norm and the last block's
    context norm (both AdaLayerNormContinuous) swap their shift and scale halves."""
    last = num_layers - 1
    block = r"joint_blocks\.(\d+)\.{}\.(weight|bias)"
    return [
        Rule(r"pos_embed", "pos_embed.pos_embed"),
        *[Rule(rf"{re.escape(src)}\.(weight|bias)", rf"{dst}.\1") for src, dst in TOP_LEVEL],
        Rule(rf"{re.escape(FINAL_ADALN[0])}\.(weight|bias)", rf"{FINAL_ADALN[1]}.\1", swap_halves),
        Rule(rf"joint_blocks\.({last})\.context_block\.adaLN_modulation\.1\.(weight|bias)",
             r"transformer_blocks.\1.norm1_context.linear.\2", swap_halves),
        *[Rule(block.format(re.escape(src)), rf"transformer_blocks.\1.{dst}.\2") for src, dst in BLOCK],
        *[Split(block.format(re.escape(src)), tuple(rf"transformer_blocks.\1.{d}.\2" for d in dsts))
          for src, dsts in BLOCK_QKV],
    ]


def transformer_modules(num_layers: int) -> list[str]:
    """Every original module name the mapping knows, for an MMDiT of `num_layers` blocks."""
    blocks = [src for src, _ in BLOCK] + [src for src, _ in BLOCK_QKV]
    return ([src for src, _ in TOP_LEVEL] + [FINAL_ADALN[0]]
            + [f"joint_blocks.{i}.{src}" for i in range(num_layers) for src in blocks])


def _map_transformer(weights: Mapping[str, mx.array], overrides: Mapping) -> tuple[dict, dict[str, mx.array]]:
    _shape(weights, "joint_blocks.0.x_block.attn.qkv.weight", "transformer")
    tensors = map_tensors(weights, transformer_rules(_count(weights, r"joint_blocks\.(\d+)\.")))
    config = MMDiTConfig.infer(tensors, overrides.get("sample_size", 128), overrides.get("attention_head_dim", 64))
    return {"_class_name": "SD3Transformer2DModel", **config.to_diffusers(), **overrides}, tensors


# VAE ------------------------------------------------------------------------------------------------------

def vae_rules(levels: int) -> list[Rule]:
    """Original (ldm) autoencoder names -> diffusers `AutoencoderKL` names, but for `nin_shortcut` (see
    VAE_LEAF_RULES). ldm numbers the decoder's levels from the bottom, diffusers from the top."""
    return [
        Rule(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.(weight|bias)", r"\1.mid_block.attentions.0.to_\2.\3",
             conv1x1_to_linear),
        Rule(r"(encoder|decoder)\.mid\.attn_1\.proj_out\.(weight|bias)", r"\1.mid_block.attentions.0.to_out.0.\2",
             conv1x1_to_linear),
        Rule(r"(encoder|decoder)\.mid\.attn_1\.norm\.(weight|bias)", r"\1.mid_block.attentions.0.group_norm.\2"),
        Rule(r"(encoder|decoder)\.mid\.block_1\.(.+)", r"\1.mid_block.resnets.0.\2"),
        Rule(r"(encoder|decoder)\.mid\.block_2\.(.+)", r"\1.mid_block.resnets.1.\2"),
        Rule(r"(encoder|decoder)\.norm_out\.(weight|bias)", r"\1.conv_norm_out.\2"),
        Rule(r"encoder\.down\.(\d+)\.block\.(.+)", r"encoder.down_blocks.\1.resnets.\2"),
        Rule(r"encoder\.down\.(\d+)\.downsample\.(.+)", r"encoder.down_blocks.\1.downsamplers.0.\2"),
        *[Rule(rf"decoder\.up\.{levels - 1 - i}\.block\.(.+)", rf"decoder.up_blocks.{i}.resnets.\1")
          for i in range(levels)],
        *[Rule(rf"decoder\.up\.{levels - 1 - i}\.upsample\.(.+)", rf"decoder.up_blocks.{i}.upsamplers.0.\1")
          for i in range(levels)],
    ]


VAE_LEAF_RULES = [Rule(r"(.+)\.nin_shortcut\.(weight|bias)", r"\1.conv_shortcut.\2")]  # after vae_rules


def _map_vae(weights: Mapping[str, mx.array], overrides: Mapping) -> tuple[dict, dict[str, mx.array]]:
    _shape(weights, "encoder.down.0.block.0.conv1.weight", "vae")
    levels = _count(weights, r"encoder\.down\.(\d+)\.")
    tensors = remap(remap(weights, vae_rules(levels)), VAE_LEAF_RULES)
    shape = partial(_shape, tensors, component="vae")
    config = {
        "_class_name": "AutoencoderKL",
        "in_channels": shape("encoder.conv_in.weight")[1],
        "out_channels": shape("decoder.conv_out.weight")[0],
        "latent_channels": shape("decoder.conv_in.weight")[1],
        "block_out_channels": [shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(levels)],
        "layers_per_block": _count(tensors, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "mid_block_add_attention": "decoder.mid_block.attentions.0.to_q.weight" in tensors,
        "use_quant_conv": "quant_conv.weight" in tensors,
        "use_post_quant_conv": "post_quant_conv.weight" in tensors,
        "scaling_factor": 1.5305,  # the SD3 autoencoder's latent statistics
        "shift_factor": 0.0609,
        "sample_size": 1024,
        "force_upcast": True,
    }
    return {**config, **overrides}, tensors


# Text encoders --------------------------------------------------------------------------------------------

# Stability's files use transformers names, with or without the `transformer.` and `text_model.` prefixes.
CLIP_RULES = [
    Rule(r"(?:transformer\.)?(?:text_model\.)?text_projection\.weight", "text_projection.weight"),
    Rule(r"(?:transformer\.)?(?:text_model\.)?(.+)", r"text_model.\1"),
]
T5_RULES = [
    Rule(r"(?:transformer\.)?(?:encoder\.embed_tokens|shared)\.weight", "shared.weight"),  # tied: the same tensor
    Rule(r"(?:transformer\.)?(.+)", r"\1"),
]
# Dropped: buffers, and CLIP-L's projection: SD3 uses CLIP-L's pooled output unprojected (Stability's
# reference code; diffusers' single-file loader sets it to the identity, as our CLIP loader does when absent).
DROPPED = {"clip_l": r".*(position_ids|text_projection\.weight)", "clip_g": r".*position_ids"}


def _clip_config(tensors: Mapping[str, mx.array], kind: str, component: str) -> dict:
    shape = partial(_shape, tensors, component=component)
    vocab, hidden = shape("text_model.embeddings.token_embedding.weight")
    config = {
        "architectures": ["CLIPTextModelWithProjection"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": shape("text_model.encoder.layers.0.mlp.fc1.weight")[0],
        "num_hidden_layers": _count(tensors, r"text_model\.encoder\.layers\.(\d+)\."),
        "projection_dim": tensors["text_projection.weight"].shape[0] if "text_projection.weight" in tensors else hidden,
        "max_position_embeddings": shape("text_model.embeddings.position_embedding.weight")[0],
        "hidden_act": "quick_gelu" if kind == "clip_l" else "gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
    }
    if hidden % CLIP_HEAD_DIM == 0:
        config["num_attention_heads"] = hidden // CLIP_HEAD_DIM
    return config


def _t5_config(tensors: Mapping[str, mx.array], component: str) -> dict:
    shape = partial(_shape, tensors, component=component)
    vocab, d_model = shape("shared.weight")
    buckets, heads = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    return {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "vocab_size": vocab,
        "d_model": d_model,
        "d_kv": shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0] // heads,
        "num_heads": heads,
        "d_ff": shape("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0],
        "num_layers": _count(tensors, r"encoder\.block\.(\d+)\."),
        "relative_attention_num_buckets": buckets,
        "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu",
        "dense_act_fn": "gelu_new",
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-6,
        "is_encoder_decoder": False,
        "use_cache": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
    }


def map_encoder(weights: Mapping[str, mx.array], kind: str, overrides: Mapping | None = None) -> tuple[dict, dict]:
    """A CLIP-L / CLIP-G / T5-XXL state dict in Stability's naming (`kind` "clip_l", "clip_g" or "t5xxl") ->
    (transformers config dict, transformers-named tensors). `overrides` update the inferred config."""
    if kind not in ENCODER_KINDS:
        raise ValueError(f"unknown text encoder kind {kind!r}; use one of {sorted(ENCODER_KINDS)}.")
    component = ENCODER_KINDS[kind]
    dropped = re.compile(DROPPED.get(kind, r"(?!)"))  # (?!) matches nothing
    kept = {k: v for k, v in weights.items() if not dropped.fullmatch(k)}
    if kind == "t5xxl":
        tensors = remap(kept, T5_RULES)
        return {**_t5_config(tensors, component), **(overrides or {})}, tensors
    tensors = remap(kept, CLIP_RULES)
    config = {**_clip_config(tensors, kind, component), **(overrides or {})}
    if "num_attention_heads" not in config:
        raise WeightsError(
            f"{component}: cannot infer the attention heads of a {config['hidden_size']}-wide CLIP (not a multiple "
            f"of {CLIP_HEAD_DIM}); give num_attention_heads in the {component} config overrides."
        )
    return config, tensors


# Whole checkpoints ----------------------------------------------------------------------------------------

def map_single_file(
    weights: Mapping[str, mx.array], overrides: Mapping[str, Mapping] | None = None
) -> dict[str, tuple[dict, dict[str, mx.array]]]:
    """A single-file checkpoint's state dict -> {component: (config, diffusers-named tensors)} for each of
    "transformer", "vae", "text_encoder" (CLIP-L), "text_encoder_2" (CLIP-G), "text_encoder_3" (T5) present.

    `overrides[component]` updates that component's inferred config (for what shapes cannot tell, e.g. the
    head size of a transformer without qk-norm, 64 in every SD3 model, or its `sample_size`)."""
    overrides = overrides or {}
    kinds = {component: kind for kind, component in ENCODER_KINDS.items()}
    out = {}
    for component, prefix in _prefixes(weights).items():
        part = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        extra = overrides.get(component, {})
        if component == "transformer":
            out[component] = _map_transformer(part, extra)
        elif component == "vae":
            out[component] = _map_vae(part, extra)
        else:
            out[component] = map_encoder(part, kinds[component], extra)
    return out


def _prefixes(keys: Iterable[str]) -> dict[str, str]:
    """The components present and their key prefixes; a bare MMDiT (no prefix) is a transformer."""
    keys = list(keys)
    found = {c: p for c, p in PREFIXES.items() if any(k.startswith(p) for k in keys)}
    if not found and any(k.startswith("joint_blocks.") for k in keys):
        found["transformer"] = ""
    return found


def read_header(path: str | Path) -> dict[str, dict]:
    """The tensor table of a .safetensors file (name -> dtype, shape, data_offsets) read without loading
    any tensor; `WeightsError` for a missing, pickled, truncated or corrupt file."""
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file.")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if length is None or 8 + length > size:
            raise WeightsError(f"{path}: not a safetensors file or truncated (bad header); re-download it.")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise WeightsError(f"{path}: corrupt safetensors header (not JSON); re-download it.") from None
    header.pop("__metadata__", None)
    data = size - 8 - length
    short = [k for k, v in header.items() if v["data_offsets"][1] > data]
    if short:
        raise WeightsError(f"{path}: truncated: {len(short)} tensors (e.g. {short[0]}) end past the end of the file "
                           f"({size} bytes); re-download it.")
    return header


def read_single_file(
    path: str | Path, overrides: Mapping[str, Mapping] | None = None
) -> dict[str, tuple[dict, dict[str, mx.array]]]:
    """Read a Stability single-file SD3 / SD3.5 checkpoint (with or without bundled text encoders) as
    {component: (config, tensors)}, each as `read_component` reads the diffusers-layout folder. Lazy."""
    header = read_header(path)
    if not _prefixes(header):
        raise WeightsError(
            f"{path}: not a Stability SD3 single-file checkpoint (no model.diffusion_model., first_stage_model. or "
            "text_encoders.* tensors); for a diffusers-layout model pass its folder instead."
        )
    try:
        return map_single_file(load_safetensors(path), overrides)
    except WeightsError as err:
        raise WeightsError(f"{path}: {err}") from None


def read_encoder_file(
    path: str | Path, kind: str, overrides: Mapping | None = None
) -> tuple[dict, dict[str, mx.array]]:
    """Read a separate text encoder file as published with SD3 (clip_l.safetensors, clip_g.safetensors,
    t5xxl_fp16.safetensors: `kind` "clip_l", "clip_g" or "t5xxl") as (config, transformers-named tensors)."""
    read_header(path)
    try:
        return map_encoder(load_safetensors(path), kind, overrides)
    except WeightsError as err:
        raise WeightsError(f"{path}: {err}") from None
