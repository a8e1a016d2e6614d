"""LoRA files for tests: adapters made with peft on the diffusers / transformers reference models and saved by
diffusers' `save_lora_weights`, and the same adapters re-written in the other namings (kohya, ComfyUI, OneTrainer).

The re-writers invert the diffusers -> Stability module map independently of mlx_flash (single_file_maker's
tables and plain string edits), so the reader's mapping is checked against them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from single_file_maker import BLOCK_MODULES, QKV, TRANSFORMER_TOP, swap_halves

TRANSFORMER_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "norm1.linear", "norm1_context.linear", "norm_out.linear", "proj_out",
]  # attn2's to_q/k/v/out.0 match the attn names too
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def add_adapter(model: torch.nn.Module, name: str, targets: list[str], seed: int, std: float, **config) -> tuple:
    """Inject a peft LoRA `name` into `model`, fill A and B with N(0, std) and return (state dict, config)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    lora_config = LoraConfig(target_modules=targets, init_lora_weights=False, **config)
    inject_adapter_in_model(lora_config, model, adapter_name=name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if f".{name}." in key and ".lora_" in key:
                param.copy_(std * torch.randn(param.shape, generator=generator))
    state = get_peft_model_state_dict(model, adapter_name=name)
    metadata = lora_config.to_dict()
    return state, metadata


def save_lora(path: Path, transformer: tuple | None = None, text_encoder: tuple | None = None,
              text_encoder_2: tuple | None = None) -> Path:
    """Save (state dict, config) pairs with diffusers' StableDiffusion3Pipeline.save_lora_weights."""
    from diffusers import StableDiffusion3Pipeline

    kwargs = {}
    components = {"transformer": transformer, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    for name, pair in components.items():
        if pair is not None:
            kwargs[f"{name}_lora_layers"], kwargs[f"{name}_lora_adapter_metadata"] = pair
    StableDiffusion3Pipeline.save_lora_weights(path.parent, weight_name=path.name, **kwargs)
    return path


def _factors(path: Path) -> dict[str, float]:
    """alpha / rank of every diffusers module of a diffusers-saved file (from its metadata), by module name."""
    import json
    import re

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        ranks = {k.removesuffix(".lora_A.weight"): f.get_tensor(k).shape[0] for k in f.keys() if "lora_A" in k}
    out = {}
    for module, rank in ranks.items():
        component, name = module.split(".", 1)
        alphas = meta.get(f"{component}.alpha_pattern") or {}
        key = next((k for k in alphas if re.match(rf"(.*\.)?({k})$", name)), None)
        out[module] = (alphas[key] if key else meta[f"{component}.lora_alpha"]) / rank
    return out


def stability_module(diffusers_module: str, num_layers: int) -> tuple[str, bool]:
    """transformer_blocks.i.<diffusers> -> (joint_blocks.i.<original>, swapped halves?) for non-qkv modules."""
    if diffusers_module in TRANSFORMER_TOP:
        return TRANSFORMER_TOP[diffusers_module], diffusers_module == "norm_out.linear"
    _, index, rest = diffusers_module.split(".", 2)
    swap = rest == "norm1_context.linear" and int(index) == num_layers - 1
    return f"joint_blocks.{index}.{BLOCK_MODULES[rest]}", swap


def to_kohya(source: Path, dest: Path, num_layers: int, *, style: str = "kohya", split_qkv: bool = False,
             seed: int = 0) -> Path:
    """Re-write a diffusers-saved SD3 LoRA file in another naming, with .alpha tensors:
    - "kohya": lora_unet_ + Stability names with underscores, q/k/v fused: with `split_qkv` as sd-scripts'
      split_qkv stores them (down (3r, in), block-diagonal up, alpha / r), else as one rank-3r LoRA (the
      block-diagonal pair mixed by a random invertible matrix, alpha scaled to keep alpha / rank);
      text encoders under lora_te1_ / lora_te2_;
    - "comfy": diffusion_model. + Stability names (dotted), kohya's tensors;
    - "onetrainer": lora_transformer_ + diffusers names with underscores, lora_te1_ / lora_te2_."""
    state = {k: v.float() for k, v in load_file(str(source)).items()}
    factors = _factors(source)
    modules = {k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight")}
    out: dict[str, torch.Tensor] = {}
    rng = np.random.default_rng(seed)

    def put(prefix: str, name: str, down, up, alpha: float, sep: str) -> None:
        key = prefix + (name.replace(".", "_") if sep == "_" else name)
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down.contiguous(), up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(alpha))

    te_prefix = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    done = set()
    for module in sorted(modules):
        component, name = module.split(".", 1)
        down, up = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
        alpha = factors[module] * down.shape[0]
        if component != "transformer":
            put(te_prefix[component], name, down, up, alpha, "_")
            continue
        if style == "onetrainer":
            put("lora_transformer_", name, down, up, alpha, "_")
            continue
        prefix, sep = ("lora_unet_", "_") if style == "kohya" else ("diffusion_model.", ".")
        block, index, rest = name.split(".", 2) if name.startswith("transformer_blocks.") else (None, None, name)
        fused = next(((src, dsts) for src, dsts in QKV.items() if rest in dsts), None)
        if fused is None:
            original, swap = stability_module(name, num_layers)
            put(prefix, original, down, swap_halves(up) if swap else up, alpha, sep)
            continue
        src, dsts = fused
        if (index, src) in done:
            continue
        done.add((index, src))
        parts = [f"transformer.{block}.{index}.{d}" for d in dsts]
        downs = [state[f"{p}.lora_A.weight"] * factors[p] for p in parts]  # the factor moved into down
        ups = [state[f"{p}.lora_B.weight"] for p in parts]
        ranks = [d.shape[0] for d in downs]
        big_down = torch.cat(downs)
        big_up = torch.block_diag(*ups)
        if split_qkv:  # sd-scripts needs equal ranks per part
            assert len(set(ranks)) == 1, "split_qkv needs one rank for q, k and v"
            put(prefix, f"joint_blocks.{index}.{src}", big_down, big_up, ranks[0], sep)
        else:
            mix = torch.from_numpy(rng.standard_normal((sum(ranks), sum(ranks))) + 3 * np.eye(sum(ranks)))
            mixed_up = (big_up.double() @ mix).float()
            mixed_down = (torch.linalg.inv(mix) @ big_down.double()).float()
            put(prefix, f"joint_blocks.{index}.{src}", mixed_down, mixed_up, sum(ranks), sep)
    save_file(out, str(dest))
    return dest
