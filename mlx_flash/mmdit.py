"""The rectified-flow transformer of SD3 (MMDiT) and SD3.5 Medium / Flash (MMDiT-X), as diffusers'
`SD3Transformer2DModel` computes it. Latents are NHWC: (B, H, W, 16)."""

from __future__ import annotations

import math
import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from . import cpu_ops
from .cpu_ops import fast_path, on_cpu
from .lanes import Lanes
from .quantization import is_quantized, layer_by_layer, shared_float_weights
from .weights import (
    Fuse,
    Rule,
    WeightsError,
    conv_to_nhwc,
    is_converted,
    load_into,
    quantize_like,
    read_component,
    remap,
    save_component,
)

NORM_EPS = 1e-6


def attention(q: mx.array, k: mx.array, v: mx.array, per_head: bool = True) -> mx.array:
    """Scaled dot-product attention of (B, heads, tokens, head_dim) arrays. On the CPU, where attention is not
    fused, one head at a time, each evaluated before the next: one head's scores exist at once instead of all
    heads' (24x less memory for SD3.5), and MLX's q k^T products (K = 64) run at two thirds to three quarters of the
    float32 matmul peak instead of a quarter for all heads batched (benchmarks/mmdit_step.py); the softmax is
    `cpu_ops.softmax_attention`'s (MLX's CPU exp is scalar). `per_head=False` in training: evaluating inside a
    checkpointed block's recomputation keeps a copy of the block's weights."""
    return lane_attention([q], k, v, per_head, Lanes())[0]


def lane_attention(queries: Sequence[mx.array], k: mx.array, v: mx.array, per_head: bool, lanes: Lanes
                   ) -> list[mx.array]:
    """`attention` of each lane's queries over the keys and values of all lanes, lane i on its stream; on the
    CPU head by head, each head of every lane evaluated together."""
    scale = k.shape[-1] ** -0.5
    if not on_cpu() or not per_head:
        return lanes.map(lambda q: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale), queries)
    attend = cpu_ops.softmax_attention if fast_path(k) else mx.fast.scaled_dot_product_attention

    def head(i: int) -> list[mx.array]:
        return lanes.map(lambda q: attend(q[:, i : i + 1], k[:, i : i + 1], v[:, i : i + 1], scale=scale), queries)

    heads = []
    for i in range(k.shape[1]):
        heads.append(head(i))
        mx.eval(heads[-1])
    return lanes.map(lambda lane_heads: mx.concatenate(lane_heads, axis=1), list(zip(*heads)))


@dataclass(frozen=True)
class MMDiTConfig:
    """Transformer hyper-parameters (diffusers `transformer/config.json` names, hidden size = heads x head_dim)."""

    num_layers: int = 24
    num_attention_heads: int = 24
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int = 16
    patch_size: int = 2
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 2048
    pos_embed_max_size: int = 192
    sample_size: int = 128
    qk_norm: bool = False
    dual_attention_layers: tuple[int, ...] = field(default=())

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_diffusers(cls, config: Mapping) -> "MMDiTConfig":
        """From a diffusers `transformer/config.json` dictionary."""
        if config.get("caption_projection_dim", None) not in (None, config["num_attention_heads"] * config["attention_head_dim"]):
            raise ValueError("transformer config: caption_projection_dim must equal heads x head_dim.")
        names = {f for f in cls.__dataclass_fields__ if f != "qk_norm"}
        kwargs = {k: v for k, v in config.items() if k in names}
        kwargs["dual_attention_layers"] = tuple(config.get("dual_attention_layers") or ())
        return cls(qk_norm=config.get("qk_norm") == "rms_norm", **kwargs)

    def same_architecture(self, other: MMDiTConfig) -> bool:
        """Whether the two configurations differ at most in their default sample size."""
        return replace(self, sample_size=other.sample_size) == other

    def to_diffusers(self) -> dict:
        """The diffusers `transformer/config.json` fields of this configuration."""
        return {
            "num_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "attention_head_dim": self.attention_head_dim,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "patch_size": self.patch_size,
            "joint_attention_dim": self.joint_attention_dim,
            "caption_projection_dim": self.hidden_size,
            "pooled_projection_dim": self.pooled_projection_dim,
            "pos_embed_max_size": self.pos_embed_max_size,
            "sample_size": self.sample_size,
            "qk_norm": "rms_norm" if self.qk_norm else None,
            "dual_attention_layers": list(self.dual_attention_layers),
        }

    @classmethod
    def infer(cls, weights: Mapping[str, mx.array], sample_size: int = 128, head_dim: int = 64) -> "MMDiTConfig":
        """Infer the configuration from a diffusers-named state dict's tensor names and shapes.

        The head size shows in the qk-norm weights; without qk-norm it is `head_dim` (64 in every SD3 model)."""
        try:
            blocks = {int(m.group(1)) for k in weights if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
            dual = tuple(sorted({int(m.group(1)) for k in weights if (m := re.match(r"transformer_blocks\.(\d+)\.attn2\.", k))}))
            hidden, joint = weights["context_embedder.weight"].shape
            proj = weights["pos_embed.proj.weight"].shape  # (D, C, p, p)
            qk_norm = "transformer_blocks.0.attn.norm_q.weight" in weights
            if qk_norm:
                head_dim = weights["transformer_blocks.0.attn.norm_q.weight"].shape[0]
            positions = weights["pos_embed.pos_embed"].shape[1]
            pooled = weights["time_text_embed.text_embedder.linear_1.weight"].shape[1]
            out = weights["proj_out.weight"].shape[0] // (proj[2] * proj[3])
        except KeyError as err:
            raise WeightsError(f"transformer: cannot infer the model configuration, tensor {err} is missing; "
                               "is this an SD3 / SD3.5 transformer checkpoint?") from None
        if hidden % head_dim:
            raise WeightsError(f"transformer: hidden size {hidden} is not a multiple of the head size {head_dim}.")
        return cls(
            num_layers=max(blocks) + 1,
            num_attention_heads=hidden // head_dim,
            attention_head_dim=head_dim,
            in_channels=proj[1],
            out_channels=out,
            patch_size=proj[2],
            joint_attention_dim=joint,
            pooled_projection_dim=pooled,
            pos_embed_max_size=math.isqrt(positions),
            sample_size=sample_size,
            qk_norm=qk_norm,
            dual_attention_layers=dual,
        )


def layer_norm(x: mx.array) -> mx.array:
    return mx.fast.layer_norm(x, None, None, NORM_EPS)


@mx.compile
def scale_shift(x_norm: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    """adaLN's modulation of normalized tokens (B, N, D) by per-sample vectors (B, D), in one pass."""
    return x_norm * (1 + scale[:, None]) + shift[:, None]


@mx.compile
def gated(x: mx.array, gate: mx.array, y: mx.array) -> mx.array:
    """adaLN-Zero's gated residual x + gate * y of tokens (B, N, D) with a per-sample gate (B, D), in one pass."""
    return x + gate[:, None] * y


def modulate(x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    return scale_shift(layer_norm(x), shift, scale)


def timestep_sinusoid(t: mx.array, dim: int = 256, max_period: float = 10000.0) -> mx.array:
    """[cos, sin] embedding of (B,) timesteps, as diffusers' Timesteps(flip_sin_to_cos=True, shift=0)."""
    half = dim // 2
    freqs = mx.exp(-math.log(max_period) * mx.arange(half, dtype=mx.float32) / half)
    angles = t.astype(mx.float32)[:, None] * freqs[None]
    return mx.concatenate([mx.cos(angles), mx.sin(angles)], axis=-1)


class MLPEmbedder(nn.Module):
    """linear -> SiLU -> linear."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        self.text_embedder = MLPEmbedder(pooled_dim, dim)

    def __call__(self, timesteps: mx.array, pooled: mx.array) -> mx.array:
        t = timestep_sinusoid(timesteps).astype(pooled.dtype)
        return self.timestep_embedder(t) + self.text_embedder(pooled)


def sincos_position_table(dim: int, size: int, base_size: int) -> mx.array:
    """SD3's fixed 2D sin-cos position table, (1, size * size, dim): each half of the channels encodes one axis
    (x first) as sin and cos of the grid coordinate, scaled to a `base_size` grid, at frequencies 10000^(-k/(dim/4))."""
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (mx.arange(quarter, dtype=mx.float32) / quarter)
    coords = mx.arange(size, dtype=mx.float32) * (base_size / size)
    angles = coords[:, None] * frequencies[None]  # (size, quarter)
    axis = mx.concatenate([mx.sin(angles), mx.cos(angles)], axis=1)  # (size, dim / 2)
    x = mx.broadcast_to(axis[None, :, :], (size, size, dim // 2))
    y = mx.broadcast_to(axis[:, None, :], (size, size, dim // 2))
    return mx.concatenate([x, y], axis=2).reshape(1, size * size, dim)


class PatchEmbed(nn.Module):
    """Patchify conv plus the position table (SD3's sin-cos one until weights load), centre-cropped to the
    latent's patch grid."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        p, size = config.patch_size, config.pos_embed_max_size
        self.patch_size, self.max_size = p, size
        self.proj = nn.Conv2d(config.in_channels, config.hidden_size, kernel_size=p, stride=p)
        self.pos_embed = sincos_position_table(config.hidden_size, size, config.sample_size // p)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.proj(x)
        b, h, w, d = x.shape
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        table = self.pos_embed.reshape(self.max_size, self.max_size, d)[top : top + h, left : left + w]
        return (x + table).reshape(b, h * w, d)


class Attention(nn.Module):
    """Multi-head attention with fused qkv projections. With `context_dim`, the joint attention of MMDiT:
    context tokens get their own projections and attend together with the image tokens."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, joint: bool = False, context_out: bool = True):
        super().__init__()
        self.heads = heads
        self.per_head = True  # see attention(); off in training
        self.qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)
        head_dim = dim // heads
        if qk_norm:
            self.norm_q = nn.RMSNorm(head_dim, eps=NORM_EPS)
            self.norm_k = nn.RMSNorm(head_dim, eps=NORM_EPS)
        if joint:
            self.add_qkv = nn.Linear(dim, 3 * dim)
            if qk_norm:
                self.norm_added_q = nn.RMSNorm(head_dim, eps=NORM_EPS)
                self.norm_added_k = nn.RMSNorm(head_dim, eps=NORM_EPS)
            if context_out:
                self.to_add_out = nn.Linear(dim, dim)

    def _heads(self, proj: nn.Linear, x: mx.array, norm_q: str, norm_k: str) -> tuple[mx.array, ...]:
        b, n, _ = x.shape
        if hasattr(proj, "output_parts"):  # a LoRA layer (lora._Adapted) adds per-part adapters per part
            q, k, v = proj.output_parts(x, 3).reshape(3, b, n, self.heads, -1).transpose(0, 1, 3, 2, 4)
        else:
            q, k, v = proj(x).reshape(b, n, 3, self.heads, -1).transpose(2, 0, 3, 1, 4)
        if norm_q in self:
            q, k = self[norm_q](q), self[norm_k](k)
        return q, k, v

    def project(self, x: mx.array, context: mx.array | None = None) -> tuple[mx.array, mx.array, mx.array]:
        """q, k, v (B, heads, tokens, head_dim) of the image tokens `x`, then of the `context` tokens if given."""
        q, k, v = self._heads(self.qkv, x, "norm_q", "norm_k")
        if context is not None:
            cq, ck, cv = self._heads(self.add_qkv, context, "norm_added_q", "norm_added_k")
            q, k, v = (mx.concatenate(pair, axis=2) for pair in ((q, cq), (k, ck), (v, cv)))
        return q, k, v

    def output(self, out: mx.array, n: int) -> tuple[mx.array, mx.array | None]:
        """The output projections of attention's result `out` (B, heads, tokens, head_dim) whose first `n` tokens
        are image tokens: the image tokens', and the context tokens' where this layer has them."""
        b, heads, tokens, head_dim = out.shape
        out = out.transpose(0, 2, 1, 3).reshape(b, tokens, heads * head_dim)
        x_out, c_out = out[:, :n], out[:, n:]
        c_out = self.to_add_out(c_out) if "to_add_out" in self else None
        return self.to_out(x_out), c_out

    def __call__(self, x: mx.array, context: mx.array | None = None) -> tuple[mx.array, mx.array | None]:
        return self.output(attention(*self.project(x, context), self.per_head), x.shape[1])


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.fast = True  # cpu_ops' tanh where it applies; off in training (its backward keeps every term)

    def __call__(self, x: mx.array) -> mx.array:
        gelu = cpu_ops.gelu_approx if self.fast and fast_path(x) else nn.gelu_approx  # MLX's CPU tanh is slow
        return self.fc2(gelu(self.fc1(x)))


class AdaNorm(nn.Module):
    """The adaLN modulation: Linear(D -> n*D) of SiLU(temb), split into n vectors (B, D)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def __call__(self, cond: mx.array) -> list[mx.array]:
        return mx.split(self.linear(cond), self.n, axis=-1)


BlockModulation = tuple[list[mx.array], list[mx.array]]


class JointBlock(nn.Module):
    """One MMDiT block: joint attention of image and context streams, each with adaLN-Zero and an MLP.
    Dual-attention blocks (MMDiT-X) add a self-attention over image tokens; the last block only feeds
    its context into attention (context_pre_only)."""

    def __init__(self, config: MMDiTConfig, dual: bool, last: bool):
        super().__init__()
        dim, heads = config.hidden_size, config.num_attention_heads
        self.dual, self.last = dual, last
        self.norm1 = AdaNorm(dim, 9 if dual else 6)
        self.norm1_context = AdaNorm(dim, 2 if last else 6)
        self.attn = Attention(dim, heads, config.qk_norm, joint=True, context_out=not last)
        if dual:
            self.attn2 = Attention(dim, heads, config.qk_norm)
        self.ff = FeedForward(dim)
        if not last:
            self.ff_context = FeedForward(dim)

    def modulation(self, cond: mx.array) -> BlockModulation:
        """The block's adaLN vectors for the conditioning SiLU(temb): image stream's, then context's."""
        return self.norm1(cond), self.norm1_context(cond)

    def __call__(self, x: mx.array, c: mx.array, modulation: BlockModulation) -> tuple[mx.array, mx.array]:
        (c,), (x,) = self.on_lanes([x], [c], modulation, Lanes())
        return c, x

    def on_lanes(self, xs: Sequence[mx.array], cs: Sequence[mx.array], modulation: BlockModulation, lanes: Lanes
                 ) -> tuple[list[mx.array], list[mx.array]]:
        """The block on token lanes (`lanes.split` of the image and the context tokens): each lane's tokens
        attend over every lane's (attention evaluates head by head). Returns the context lanes, then the image lanes.
        A quantized layer's weight is dequantized once for all lanes."""
        with shared_float_weights(lanes.slices):
            inputs = lanes.map(lambda x, c: self.attention_inputs(x, c, modulation), xs, cs)
        outputs = [self._attend(lanes, self.attn, [joint for joint, _ in inputs])]
        if self.dual:
            outputs.append(self._attend(lanes, self.attn2, [second for _, second in inputs]))
        with shared_float_weights(lanes.slices):
            results = lanes.map(lambda x, c, *out: self.attention_outputs(x, c, out, modulation), xs, cs, *outputs)
        return [c for c, _ in results], [x for _, x in results]

    @staticmethod
    def _attend(lanes: Lanes, layer: Attention, qkv: Sequence[tuple[mx.array, ...]]) -> list[mx.array]:
        queries, keys, values = zip(*qkv)
        return lane_attention(queries, lanes.join(keys, 2), lanes.join(values, 2), layer.per_head, lanes)

    def attention_inputs(self, x: mx.array, c: mx.array, modulation: BlockModulation) -> tuple[tuple, tuple | None]:
        """q, k, v of the joint attention (image tokens, then context tokens), and of the dual block's second
        attention (None in other blocks)."""
        (shift, scale, _, _, _, _, *second), context_mod = modulation
        dtype = shift.dtype
        x_norm = layer_norm(x)
        x_in = scale_shift(x_norm, shift, scale).astype(dtype)
        c_shift, c_scale = context_mod[::-1] if self.last else context_mod[:2]
        joint = self.attn.project(x_in, modulate(c, c_shift, c_scale).astype(dtype))
        if not self.dual:
            return joint, None
        shift2, scale2, _ = second
        return joint, self.attn2.project(scale_shift(x_norm, shift2, scale2).astype(dtype))

    def attention_outputs(self, x: mx.array, c: mx.array, attended: Sequence[mx.array], modulation: BlockModulation
                          ) -> tuple[mx.array, mx.array]:
        """The rest of the block from the attention results (`attended`: the joint one, then the second one in a
        dual block): the gated residuals and the MLPs. Returns the context tokens, then the image tokens."""
        (_, _, gate, shift_mlp, scale_mlp, gate_mlp, *second), context_mod = modulation
        dtype = gate.dtype
        x_attn, c_attn = self.attn.output(attended[0], x.shape[1])
        x = gated(x, gate, x_attn)
        if self.dual:
            _, _, gate2 = second
            x = gated(x, gate2, self.attn2.output(attended[1], x.shape[1])[0])
        x = gated(x, gate_mlp, self.ff(modulate(x, shift_mlp, scale_mlp).astype(dtype)))

        if self.last:
            return c, x
        _, _, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = context_mod
        c = gated(c, c_gate, c_attn)
        c = gated(c, c_gate_mlp, self.ff_context(modulate(c, c_shift_mlp, c_scale_mlp).astype(dtype)))
        return c, x


class MMDiT(nn.Module):
    """SD3 / SD3.5 transformer. Call with NHWC latents (B, H, W, C), timesteps (B,) = sigma * 1000,
    prompt embeddings (B, L, joint_attention_dim) and pooled embeddings (B, pooled_projection_dim).

    `float32_residual` keeps the residual streams in float32 when the weights are half precision
    (SD3.5 Large overflows in pure float16). `set_training` prepares it for differentiation."""

    def __init__(self, config: MMDiTConfig, float32_residual: bool = False):
        super().__init__()
        self.config = config
        self.float32_residual = float32_residual
        self.gradient_checkpointing = False
        self.inference = True  # set_training(True) clears it
        dim = config.hidden_size
        self.pos_embed = PatchEmbed(config)
        self.time_text_embed = TimeTextEmbed(dim, config.pooled_projection_dim)
        self.context_embedder = nn.Linear(config.joint_attention_dim, dim)
        self.transformer_blocks = [
            JointBlock(config, dual=i in config.dual_attention_layers, last=i == config.num_layers - 1)
            for i in range(config.num_layers)
        ]
        self.norm_out = AdaNorm(dim, 2)
        self.proj_out = nn.Linear(dim, config.patch_size**2 * config.out_channels)

    def set_training(self, training: bool, checkpointing: bool = True) -> None:
        """For differentiation: gradient checkpointing per block (if `checkpointing`) and attention over all
        heads in one call (see `attention`); `set_training(False)` restores inference."""
        self.gradient_checkpointing = training and checkpointing
        self.inference = not training
        for module in self.modules():
            if isinstance(module, Attention):
                module.per_head = not training
            elif isinstance(module, FeedForward):
                module.fast = not training

    @layer_by_layer()
    def modulation(self, timesteps: mx.array, pooled: mx.array) -> list:
        """Every adaLN vector of a forward pass (per block, then the output norm's scale and shift). They depend
        only on the timesteps and the pooled prompt, so a few-step run can compute them all up front and then
        `drop_modulation_weights()`."""
        if "time_text_embed" not in self:
            raise RuntimeError("the adaLN weights were dropped; pass the precomputed `modulation`.")
        cond = nn.silu(self.time_text_embed(timesteps, pooled.astype(self.compute_dtype)))
        return [block.modulation(cond) for block in self.transformer_blocks] + [self.norm_out(cond)]

    def modulations(self, timesteps: Sequence[float], pooled: mx.array) -> dict[float, list]:
        """`modulation()` at each of several timesteps, for the batch `pooled`, by timestep. They are computed as one
        batch, so each adaLN weight is read once (on the CPU, a quantized one dequantized once), not once a step."""
        unique = list(dict.fromkeys(timesteps))
        b = pooled.shape[0]
        batched = self.modulation(mx.repeat(mx.array(unique, dtype=mx.float32), b), mx.tile(pooled, (len(unique), 1)))
        return {t: tree_map(lambda a, i=i: a[i * b : (i + 1) * b], batched) for i, t in enumerate(unique)}

    def drop_modulation_weights(self) -> None:
        """Free the weights only `modulation()` uses (over a third of SD3.5 Medium's and Large's parameters)."""
        for block in self.transformer_blocks:
            del block["norm1"], block["norm1_context"]
        del self["norm_out"], self["time_text_embed"]

    @property
    def compute_dtype(self) -> mx.Dtype:
        """The precision of the weights (of the scales, for quantized weights)."""
        return self.proj_out.get("scales", self.proj_out.weight).dtype

    def _run_block(self, block: JointBlock, xs: list[mx.array], cs: list[mx.array], modulation: BlockModulation,
                   lanes: Lanes) -> tuple[list[mx.array], list[mx.array]]:
        """One block on the token lanes (checkpointed in training); several lanes evaluate it at once, within
        their BLAS threads (`Lanes.running`)."""
        if lanes.count > 1:
            cs, xs = block.on_lanes(xs, cs, modulation, lanes)
            mx.eval(cs, xs)
            return cs, xs
        run = nn.utils.checkpoint(block) if self.gradient_checkpointing else block
        c, x = run(xs[0], cs[0], modulation)
        return [c], [x]

    def dequantization_bound(self) -> AbstractContextManager:
        """Around the blocks: on the CPU, a quantized model's layers evaluate one by one, on token lanes all lanes'
        calls of a layer together (`quantization.layer_by_layer`): one layer's dequantized weight at a time."""
        if not (self.inference and on_cpu() and is_quantized(self)):
            return nullcontext()
        return layer_by_layer()

    def lanes(self, tokens: int) -> Lanes:
        """The token lanes of a forward pass (`mlx_flash.lanes`): several in inference on the CPU, else one."""
        return Lanes.for_inference(tokens) if self.inference else Lanes()

    def check_latent_size(self, height: int, width: int) -> None:
        """Raise ValueError unless a latent of this size fits the patch size and the position table."""
        p, size = self.config.patch_size, self.config.pos_embed_max_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not divisible by the patch size {p}; "
                             f"use an image size that is a multiple of {8 * p}.")
        if height // p > size or width // p > size:
            raise ValueError(f"latent size {height}x{width} exceeds the position table ({size}x{size} patches); "
                             f"this model supports images up to {size * p * 8}x{size * p * 8} pixels.")

    def __call__(
        self,
        latents: mx.array,
        timesteps: mx.array,
        context: mx.array,
        pooled: mx.array | None = None,
        skip_layers: Iterable[int] = (),
        modulation: list | None = None,
        controlnet_residuals: Sequence[mx.array] | None = None,
    ) -> mx.array:
        """Velocity prediction. `modulation` (from `modulation()`) may replace `timesteps` and `pooled`.
        `controlnet_residuals` (a ControlNet's outputs, image tokens) are added after the blocks, skipped or
        not, except the last: residual int(i / (blocks / residuals)) after block i, as diffusers does."""
        b, height, width, _ = latents.shape
        self.check_latent_size(height, width)
        dtype = self.compute_dtype
        stream = mx.float32 if self.float32_residual else dtype
        latents, context = latents.astype(dtype), context.astype(dtype)

        if modulation is None:
            modulation = self.modulation(timesteps, pooled)
        *block_mods, (scale, shift) = modulation
        x = self.pos_embed(latents).astype(stream)
        c = self.context_embedder(context).astype(stream)
        lanes = self.lanes(min(x.shape[1], c.shape[1]))
        xs, cs = lanes.split(x), lanes.split(c)
        residuals = [lanes.split(r.astype(x.dtype)) for r in controlnet_residuals or ()]
        skip = set(skip_layers)
        blocks = self.transformer_blocks
        with lanes.running(), self.dequantization_bound():
            for i, (block, block_mod) in enumerate(zip(blocks, block_mods)):
                if i not in skip:
                    cs, xs = self._run_block(block, xs, cs, block_mod, lanes)
                if residuals and not block.last:
                    residual = residuals[int(i / (len(blocks) / len(residuals)))]
                    xs = lanes.map(lambda x, r: x + r, xs, residual)
        x = lanes.join(xs)

        x = self.proj_out(modulate(x, shift, scale).astype(dtype))
        p, out = self.config.patch_size, self.config.out_channels
        h, w = height // p, width // p
        x = x.reshape(b, h, w, p, p, out).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, height, width, out)


# diffusers SD3Transformer2DModel names -> ours
DIFFUSERS_RULES = [
    Rule(r"pos_embed\.proj\.weight", r"pos_embed.proj.weight", conv_to_nhwc),
    Rule(r"(.*)\.to_out\.0\.(weight|bias)", r"\1.to_out.\2"),
    Rule(r"(.*)\.net\.0\.proj\.(weight|bias)", r"\1.fc1.\2"),
    Rule(r"(.*)\.net\.2\.(weight|bias)", r"\1.fc2.\2"),
    Fuse(("to_q", "to_k", "to_v"), "qkv"),
    Fuse(("add_q_proj", "add_k_proj", "add_v_proj"), "add_qkv"),
]


def mmdit_from_diffusers_weights(
    weights: Mapping[str, mx.array],
    dtype: mx.Dtype | None = None,
    float32_residual: bool = False,
    sample_size: int = 128,
    head_dim: int = 64,
) -> MMDiT:
    """Build the transformer whose configuration the diffusers-named `weights` imply, and load them."""
    model = MMDiT(MMDiTConfig.infer(weights, sample_size, head_dim), float32_residual=float32_residual)
    return load_into(model, remap(weights, DIFFUSERS_RULES), "transformer", dtype=dtype)


def load_mmdit(folder: str | Path, dtype: mx.Dtype | None = None, float32_residual: bool = False,
               config: dict | None = None) -> MMDiT:
    """Load a `transformer/` folder: diffusers layout (config.json plus one or many safetensors shards; the
    configuration is inferred from the tensors) or mlx-flash layout (converted, possibly quantized). `config`
    (the base model's config.json) stands in for a missing config.json."""
    config, weights = read_component(folder, config)
    if not is_converted(config):
        return mmdit_from_diffusers_weights(
            weights, dtype, float32_residual, config.get("sample_size", 128), config.get("attention_head_dim", 64)
        )
    model = MMDiT(MMDiTConfig.from_diffusers(config), float32_residual=float32_residual)
    quantize_like(model, weights, config.get("quantization"))
    return load_into(model, weights, "transformer", dtype=dtype)


def save_mmdit(folder: str | Path, model: MMDiT, quantization: Mapping | None = None) -> None:
    """Write the transformer as an mlx-flash layout `transformer/` folder."""
    save_component(folder, model, model.config.to_diffusers(), quantization)
