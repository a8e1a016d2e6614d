"""Stability single-file checkpoints built from diffusers-layout state dicts, for tests.

The inverse of the single-file -> diffusers mapping, written independently of mlx_flash.single_file (plain
string edits on torch tensors) so that the two check each other; diffusers' own `from_single_file` checks
this one. Works on meta tensors too, for full-size key sets without memory.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

PREFIXES = {
    "transformer": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.clip_g.transformer.",
    "text_encoder_3": "text_encoders.t5xxl.transformer.",
}
TRANSFORMER_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
BLOCK_MODULES = {  # diffusers module in transformer_blocks.i -> original module in joint_blocks.i
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}
QKV = {  # original fused projection -> the three diffusers projections it concatenates
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def split_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def transformer_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    out = {}
    for key, value in sd.items():
        module, param = split_param(key)
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = value
            continue
        if module in TRANSFORMER_TOP:
            out[f"{TRANSFORMER_TOP[module]}.{param}"] = swap_halves(value) if module == "norm_out.linear" else value
            continue
        i, rest = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module).groups()
        if any(rest in parts for parts in QKV.values()):
            continue  # fused below
        if rest == "norm1_context.linear" and int(i) == layers - 1:
            value = swap_halves(value)
        out[f"joint_blocks.{i}.{BLOCK_MODULES[rest]}.{param}"] = value
    for i in range(layers):
        for fused, parts in QKV.items():
            for param in ("weight", "bias"):
                names = [f"transformer_blocks.{i}.{part}.{param}" for part in parts]
                if names[0] in sd:
                    out[f"joint_blocks.{i}.{fused}.{param}"] = torch.cat([sd[n] for n in names], dim=0)
    return out


def vae_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down_blocks."))
    out = {}
    for key, value in sd.items():
        name = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        name = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", name)
        name = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", name)
        name = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{levels - 1 - int(m[1])}.block.", name)
        name = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{levels - 1 - int(m[1])}.upsample.", name)
        name = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", name)
        if ".mid_block.attentions.0." in name:
            leaf = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
            module, param = split_param(name.split(".mid_block.attentions.0.")[1])
            name = f"{name.split('.')[0]}.mid.attn_1.{leaf[module]}.{param}"
            if value.ndim == 2:  # linear -> 1x1 conv, as in the original
                value = value[:, :, None, None]
        out[name] = value
    return out


def encoder_to_original(sd: dict[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    """CLIP and T5 keep transformers names; Stability's files carry no CLIP-L projection."""
    if component == "text_encoder":
        sd = {k: v for k, v in sd.items() if k != "text_projection.weight"}
    return dict(sd)


def to_single_file(components: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """diffusers component state dicts (keys among PREFIXES) -> one Stability single-file state dict."""
    convert = {"transformer": transformer_to_original, "vae": vae_to_original}
    out = {}
    for component, sd in components.items():
        original = convert[component](sd) if component in convert else encoder_to_original(sd, component)
        out.update({PREFIXES[component] + k: v for k, v in original.items()})
    return out


def read_folder_state_dicts(folder: Path, components=tuple(PREFIXES)) -> dict[str, dict[str, torch.Tensor]]:
    """The safetensors tensors of each component folder of a diffusers pipeline."""
    return {
        c: {k: v for f in sorted((Path(folder) / c).glob("*.safetensors")) for k, v in load_file(f).items()}
        for c in components
    }


def diffusers_to_single_file(folder: Path, components=tuple(PREFIXES)) -> dict[str, torch.Tensor]:
    """The single-file checkpoint of a saved diffusers SD3 pipeline (with the given components)."""
    return to_single_file(read_folder_state_dicts(folder, components))
