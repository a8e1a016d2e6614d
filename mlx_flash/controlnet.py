"""SD3 / SD3.5 ControlNets, as diffusers' `SD3ControlNetModel` computes them: a copy of the first transformer
blocks that also sees the VAE-encoded control image, and returns one residual per block (zero-initialised
linear projections) that the transformer adds to its image stream (`MMDiT.__call__(controlnet_residuals=)`).

Two shapes exist. The InstantX SD3 ControlNets (canny, pose, tile) and the SD3 inpainting ControlNet have
their own position embedding, a text stream and joint blocks. Stability's SD3.5 Large ControlNets (blur,
canny, depth) have neither: they embed the latents with the transformer's `pos_embed` and run single-stream
blocks (self-attention over image tokens only). Latents are NHWC, as in mmdit.py.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn

from .mmdit import DIFFUSERS_RULES as TRANSFORMER_RULES
from .mmdit import (
    AdaNorm,
    Attention,
    FeedForward,
    JointBlock,
    MMDiTConfig,
    PatchEmbed,
    TimeTextEmbed,
    gated,
    modulate,
)
from .quantization import layer_by_layer
from .weights import (
    Rule,
    WeightsError,
    conv_to_nhwc,
    is_converted,
    load_into,
    load_safetensors,
    quantize_like,
    read_component,
    remap,
    save_component,
)


@dataclass(frozen=True)
class ControlNetConfig:
    """ControlNet hyper-parameters (diffusers `SD3ControlNetModel` names; hidden size = heads x head_dim).

    `joint_attention_dim=None`: no text stream, single-stream blocks (SD3.5 Large's ControlNets).
    `pos_embed_max_size=None`: no position embedding of its own, the transformer's is used.
    `force_zeros_for_pooled_projection`: the pipelines then feed zeros for the pooled prompt and encode the
    control image without the VAE's shift factor (a config flag, not in the tensors)."""

    num_layers: int = 12
    num_attention_heads: int = 24
    attention_head_dim: int = 64
    in_channels: int = 16
    extra_conditioning_channels: int = 0
    patch_size: int = 2
    joint_attention_dim: int | None = 4096
    pooled_projection_dim: int = 2048
    pos_embed_max_size: int | None = 192
    qk_norm: bool = False
    dual_attention_layers: tuple[int, ...] = field(default=())
    force_zeros_for_pooled_projection: bool = True

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def control_channels(self) -> int:
        """Channels of the control input: the latent channels plus any extra (the inpainting mask)."""
        return self.in_channels + self.extra_conditioning_channels

    def blocks_config(self) -> MMDiTConfig:
        """The transformer configuration the blocks and the position embedding are built from."""
        return MMDiTConfig(
            num_layers=self.num_layers, num_attention_heads=self.num_attention_heads,
            attention_head_dim=self.attention_head_dim, in_channels=self.in_channels, patch_size=self.patch_size,
            joint_attention_dim=self.joint_attention_dim or 0, pooled_projection_dim=self.pooled_projection_dim,
            pos_embed_max_size=self.pos_embed_max_size or 0, qk_norm=self.qk_norm,
            dual_attention_layers=self.dual_attention_layers,
        )

    @classmethod
    def from_diffusers(cls, config: Mapping) -> "ControlNetConfig":
        """From a diffusers ControlNet `config.json` dictionary (diffusers' defaults where a field is absent)."""
        heads, head_dim = config.get("num_attention_heads", 18), config.get("attention_head_dim", 64)
        joint = config.get("joint_attention_dim", 4096)
        if joint is not None and config.get("caption_projection_dim", 1152) != heads * head_dim:
            raise ValueError("ControlNet config: caption_projection_dim must equal heads x head_dim.")
        use_pos_embed = config.get("use_pos_embed", True)
        return cls(
            num_layers=config.get("num_layers", 18), num_attention_heads=heads, attention_head_dim=head_dim,
            in_channels=config.get("in_channels", 16),
            extra_conditioning_channels=config.get("extra_conditioning_channels", 0),
            patch_size=config.get("patch_size", 2), joint_attention_dim=joint,
            pooled_projection_dim=config.get("pooled_projection_dim", 2048),
            pos_embed_max_size=config.get("pos_embed_max_size", 96) if use_pos_embed else None,
            qk_norm=config.get("qk_norm") == "rms_norm",
            dual_attention_layers=tuple(config.get("dual_attention_layers") or ()),
            force_zeros_for_pooled_projection=config.get("force_zeros_for_pooled_projection", True),
        )

    def to_diffusers(self) -> dict:
        """The diffusers `SD3ControlNetModel` config fields of this configuration."""
        return {
            "num_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "attention_head_dim": self.attention_head_dim,
            "in_channels": self.in_channels,
            "out_channels": self.in_channels,
            "extra_conditioning_channels": self.extra_conditioning_channels,
            "patch_size": self.patch_size,
            "joint_attention_dim": self.joint_attention_dim,
            "caption_projection_dim": self.hidden_size,
            "pooled_projection_dim": self.pooled_projection_dim,
            "pos_embed_max_size": self.pos_embed_max_size,
            "use_pos_embed": self.pos_embed_max_size is not None,
            "pos_embed_type": "sincos" if self.pos_embed_max_size is not None else None,
            "qk_norm": "rms_norm" if self.qk_norm else None,
            "dual_attention_layers": list(self.dual_attention_layers),
            "force_zeros_for_pooled_projection": self.force_zeros_for_pooled_projection,
        }

    @classmethod
    def infer(cls, weights: Mapping[str, mx.array], config: Mapping | None = None,
              transformer: MMDiTConfig | None = None) -> "ControlNetConfig":
        """The configuration a state dict (diffusers or single-file names) implies. The head size shows in
        qk-norm weights, else it is `config`'s, else the `transformer`'s it runs with (64 by default); so are the
        latent channels without an own position embedding. `force_zeros_for_pooled_projection` comes from
        `config` (diffusers' default: True)."""
        config = dict(config or {})
        transformer = transformer or MMDiTConfig()
        in_channels = transformer.in_channels
        try:
            blocks = {int(m.group(1)) for k in weights if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
            dual = tuple(sorted({int(m.group(1)) for k in weights
                                 if (m := re.match(r"transformer_blocks\.(\d+)\.attn2\.", k))}))
            hidden = weights["controlnet_blocks.0.weight"].shape[0]
            control = weights["pos_embed_input.proj.weight"].shape  # (D, C + extra, p, p)
            pooled = weights["time_text_embed.text_embedder.linear_1.weight"].shape[1]
        except KeyError as err:
            raise WeightsError(f"ControlNet: cannot infer the model configuration, tensor {err} is missing; "
                               "is this an SD3 / SD3.5 ControlNet checkpoint?") from None
        head_dim = config.get("attention_head_dim", transformer.attention_head_dim)
        qk_norm = "transformer_blocks.0.attn.norm_q.weight" in weights
        if qk_norm:
            head_dim = weights["transformer_blocks.0.attn.norm_q.weight"].shape[0]
        if "pos_embed.pos_embed" in weights:
            positions = weights["pos_embed.pos_embed"].shape[1]
            max_size = math.isqrt(positions)
            in_channels = weights["pos_embed.proj.weight"].shape[1]
        else:
            max_size = None
        joint = weights["context_embedder.weight"].shape[1] if "context_embedder.weight" in weights else None
        if hidden % head_dim or not blocks:
            raise WeightsError(f"ControlNet: hidden size {hidden} and head size {head_dim} do not fit, or no "
                               "transformer blocks; is this an SD3 / SD3.5 ControlNet checkpoint?")
        return cls(
            num_layers=max(blocks) + 1, num_attention_heads=hidden // head_dim, attention_head_dim=head_dim,
            in_channels=in_channels, extra_conditioning_channels=control[1] - in_channels, patch_size=control[2],
            joint_attention_dim=joint, pooled_projection_dim=pooled, pos_embed_max_size=max_size, qk_norm=qk_norm,
            dual_attention_layers=dual,
            force_zeros_for_pooled_projection=config.get("force_zeros_for_pooled_projection", True),
        )


class PatchProjection(nn.Module):
    """A patchify conv without position table (diffusers' PatchEmbed with pos_embed_type=None)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.proj(x)
        b, h, w, d = x.shape
        return x.reshape(b, h * w, d)


class SingleBlock(nn.Module):
    """diffusers' SD3SingleTransformerBlock: adaLN-Zero, self-attention over image tokens, MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = AdaNorm(dim, 6)
        self.attn = Attention(dim, heads, qk_norm=False)
        self.ff = FeedForward(dim)

    def __call__(self, x: mx.array, cond: mx.array) -> mx.array:
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(cond)
        x = gated(x, gate, self.attn(modulate(x, shift, scale))[0])
        return gated(x, gate_mlp, self.ff(modulate(x, shift_mlp, scale_mlp)))


class ControlNet(nn.Module):
    """An SD3 / SD3.5 ControlNet. Call with NHWC latents (B, H, W, C), the control latents (B, H, W, C + extra),
    timesteps (B,) = sigma * 1000, pooled embeddings (B, pooled_projection_dim) and, with a text stream, prompt
    embeddings (B, L, joint_attention_dim); returns one residual (B, tokens, D) per block, times `scale`.
    A ControlNet without its own position embedding needs the transformer's, `patch_embed`."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        dim, blocks = config.hidden_size, config.blocks_config()
        if config.pos_embed_max_size is not None:
            self.pos_embed = PatchEmbed(blocks)
        self.time_text_embed = TimeTextEmbed(dim, config.pooled_projection_dim)
        if config.joint_attention_dim is not None:
            self.context_embedder = nn.Linear(config.joint_attention_dim, dim)
            self.transformer_blocks = [JointBlock(blocks, dual=i in config.dual_attention_layers, last=False)
                                       for i in range(config.num_layers)]
        else:
            self.transformer_blocks = [SingleBlock(dim, config.num_attention_heads) for _ in range(config.num_layers)]
        self.controlnet_blocks = [nn.Linear(dim, dim) for _ in range(config.num_layers)]
        self.pos_embed_input = PatchProjection(config.control_channels, dim, config.patch_size)

    @property
    def compute_dtype(self) -> mx.Dtype:
        """The precision of the weights (of the scales, for quantized weights)."""
        last = self.controlnet_blocks[-1]
        return last.get("scales", last.weight).dtype

    @layer_by_layer()
    def __call__(
        self,
        latents: mx.array,
        control: mx.array,
        timesteps: mx.array,
        pooled: mx.array,
        context: mx.array | None = None,
        scale: float = 1.0,
        patch_embed: PatchEmbed | None = None,
    ) -> list[mx.array]:
        dtype = self.compute_dtype
        embed = self.get("pos_embed", patch_embed)
        if embed is None:
            raise ValueError("this ControlNet has no position embedding of its own; pass the transformer's "
                             "`pos_embed` as patch_embed.")
        joint = "context_embedder" in self
        if joint and context is None:
            raise ValueError("this ControlNet has a text stream; pass the prompt embeddings as context.")
        x = embed(latents.astype(dtype))
        cond = nn.silu(self.time_text_embed(timesteps, pooled.astype(dtype)))
        x = x + self.pos_embed_input(control.astype(dtype))
        c = self.context_embedder(context.astype(dtype)) if joint else None
        samples = []
        for block in self.transformer_blocks:
            if joint:
                c, x = block(x, c, block.modulation(cond))
            else:
                x = block(x, cond)
            samples.append(x)
        return [proj(sample) * scale for proj, sample in zip(self.controlnet_blocks, samples)]


def combine_residuals(residuals: Sequence[Sequence[mx.array]]) -> list[mx.array]:
    """Several ControlNets' residuals summed block by block, as diffusers' SD3MultiControlNetModel does (the
    sum runs over the blocks all of them have)."""
    return [sum(blocks[1:], blocks[0]) for blocks in zip(*residuals)]


# diffusers SD3ControlNetModel names -> ours: the transformer's rules plus the control input's patchify conv.
DIFFUSERS_RULES = [
    Rule(r"pos_embed_input\.proj\.weight", r"pos_embed_input.proj.weight", conv_to_nhwc),
    *TRANSFORMER_RULES,
]

# Stability's single files (sd3.5_large_controlnet_*.safetensors) -> ours. diffusers'
# scripts/convert_sd3_controlnet_to_diffusers.py keeps exactly these tensors (it splits the fused qkv, which we
# keep fused); the files' other entries, unused with SD3.5 Large, are left out the same way.
SINGLE_FILE_RULES = [
    Rule(r"(transformer_blocks\.\d+\.attn)\.proj\.(weight|bias)", r"\1.to_out.\2"),
    Rule(r"(transformer_blocks\.\d+)\.mlp\.(fc[12])\.(weight|bias)", r"\1.ff.\2.\3"),
    Rule(r"(transformer_blocks\.\d+)\.adaLN_modulation\.1\.(weight|bias)", r"\1.norm1.linear.\2"),
    Rule(r"pos_embed_input\.proj\.weight", r"pos_embed_input.proj.weight", conv_to_nhwc),
    Rule(r"(transformer_blocks\.\d+\.attn\.qkv|pos_embed_input\.proj|controlnet_blocks\.\d+"
         r"|time_text_embed\.(timestep|text)_embedder\.linear_[12])\.(weight|bias)", r"\g<0>"),
]
# What the conversion script sets for these files beyond their tensors: the pipelines feed the real pooled prompt.
SINGLE_FILE_CONFIG = {"force_zeros_for_pooled_projection": False}


def is_single_file(weights: Mapping[str, mx.array]) -> bool:
    """Whether a ControlNet state dict uses Stability's single-file names."""
    return any(".adaLN_modulation." in key for key in weights)


def controlnet_from_single_file(weights: Mapping[str, mx.array], dtype: mx.Dtype | None = None,
                                transformer: MMDiTConfig | None = None) -> "ControlNet":
    """Build and load the ControlNet of a Stability single file's tensors."""
    patterns = [re.compile(rule.source) for rule in SINGLE_FILE_RULES]
    kept = {k: v for k, v in weights.items() if any(p.fullmatch(k) for p in patterns)}
    model = ControlNet(ControlNetConfig.infer(kept, SINGLE_FILE_CONFIG, transformer))
    return load_into(model, remap(kept, SINGLE_FILE_RULES), "ControlNet", dtype=dtype)


def controlnet_from_diffusers_weights(weights: Mapping[str, mx.array], config: Mapping | None = None,
                                      dtype: mx.Dtype | None = None,
                                      transformer: MMDiTConfig | None = None) -> ControlNet:
    """Build the ControlNet whose configuration the diffusers-named `weights` imply, and load them."""
    model = ControlNet(ControlNetConfig.infer(weights, config, transformer))
    return load_into(model, remap(weights, DIFFUSERS_RULES), "ControlNet", dtype=dtype)


def load_controlnet(path: str | Path, dtype: mx.Dtype | None = None,
                    transformer: MMDiTConfig | None = None) -> ControlNet:
    """Load a ControlNet: a diffusers folder (config.json + safetensors; configuration inferred from the
    tensors), an mlx-flash converted folder (possibly quantized) or a Stability single file (.safetensors).
    `transformer`: the configuration of the transformer it runs with (what the tensors leave open)."""
    path = Path(path)
    if path.is_file() or path.suffix == ".safetensors":
        weights = load_safetensors(path)
        if not is_single_file(weights):
            raise WeightsError(f"{path}: not a Stability SD3.5 ControlNet file; pass its diffusers folder "
                               "(with config.json) instead.")
        return controlnet_from_single_file(weights, dtype, transformer)
    config, weights = read_component(path)
    if not is_converted(config):
        return controlnet_from_diffusers_weights(weights, config, dtype, transformer)
    model = ControlNet(ControlNetConfig.from_diffusers(config))
    quantize_like(model, weights, config.get("quantization"))
    return load_into(model, weights, "ControlNet", dtype=dtype)


def save_controlnet(folder: str | Path, model: ControlNet, quantization: Mapping | None = None) -> None:
    """Write the ControlNet as an mlx-flash layout folder."""
    save_component(folder, model, model.config.to_diffusers(), quantization)
