"""The ControlNet and inpainting conditionings of the generation loop (denoise.Conditioning), with the semantics
of diffusers' StableDiffusion3ControlNetPipeline, StableDiffusion3ControlNetInpaintingPipeline and
StableDiffusion3InpaintPipeline.

The control image is encoded by the VAE (the posterior mean, where diffusers draws a sample) and scaled as the
pipelines do; each ControlNet acts between its start and end fractions of the steps run, at its scale, on the
batch the transformer gets (CFG doubles it: unconditional half first)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from .controlnet import ControlNet, ControlNetConfig, combine_residuals
from .inpaint import blend, latent_mask, noised
from .mmdit import PatchEmbed
from .vae import Autoencoder


def control_keep(step: int, steps: int, start: float, end: float) -> bool:
    """Whether a ControlNet acts at `step` (0-based) of the `steps` run: its start and end fractions
    (diffusers' controlnet_keep)."""
    return not (step / steps < start or (step + 1) / steps > end)


def encode_latents(vae: Autoencoder, pixels: mx.array, shift: bool = True) -> mx.array:
    """Images (B, H, W, 3) in [-1, 1] -> diffusion-space latents of the posterior mean: (mean - shift) * scale,
    the shift left out with `shift=False` (ControlNets with force_zeros_for_pooled_projection)."""
    mean, _ = vae.encode(pixels.astype(vae.dtype))
    return (mean - (vae.config.shift_factor if shift else 0.0)) * vae.config.scaling_factor


def control_latents(vae: Autoencoder, pixels: mx.array, config: ControlNetConfig) -> mx.array:
    """What a ControlNet sees of its control image (1, H, W, 3) in [-1, 1]."""
    return encode_latents(vae, pixels, shift=not config.force_zeros_for_pooled_projection)


def inpaint_control_latents(vae: Autoencoder, pixels: mx.array, mask: np.ndarray) -> mx.array:
    """An inpainting ControlNet's input: the latents of the image with its masked pixels black (-1), and the
    latent-resolution mask of what to keep (1 - mask), as one (1, h, w, 17) array."""
    masked = mx.where(mx.array(mask) > 0.5, -1.0, pixels)
    latents = encode_latents(vae, masked)
    return mx.concatenate([latents, 1 - latent_mask(mask, vae.config.factor).astype(latents.dtype)], axis=-1)


@dataclass
class ControlInput:
    """One ControlNet of a run: its model (loaded on first use), its encoded control image, its scale and the
    fractions of the steps it acts in."""

    load: Callable[[], ControlNet]
    config: ControlNetConfig
    latents: mx.array
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


class ControlNetConditioning:
    """Adds the ControlNets' residuals (summed, diffusers' SD3MultiControlNetModel) to each transformer call.

    `embeds`/`pooled` are the prompt's, `neg_*` the negative prompt's (None without CFG); `patch_embed` gives the
    transformer's position embedding, which ControlNets without their own (SD3.5 Large's) use."""

    def __init__(self, inputs: Sequence[ControlInput], embeds: mx.array, pooled: mx.array,
                 neg_embeds: mx.array | None, neg_pooled: mx.array | None, patch_embed: Callable[[], PatchEmbed]):
        self.inputs = list(inputs)
        self.embeds, self.pooled, self.neg_embeds, self.neg_pooled = embeds, pooled, neg_embeds, neg_pooled
        self.patch_embed = patch_embed
        self._models: list[ControlNet] | None = None
        self.first, self.steps = 0, 1

    def models(self) -> list[ControlNet]:
        if self._models is None:
            self._models = [unit.load() for unit in self.inputs]
        return self._models

    def prepare(self, x: mx.array, sigmas: np.ndarray, start: int) -> tuple[mx.array, int]:
        self.first, self.steps = start, len(sigmas) - 1 - start
        return x, start

    def transformer_inputs(self, x_in: mx.array, timestep: mx.array, step: int, cfg: bool) -> dict:
        context = mx.concatenate([self.neg_embeds, self.embeds]) if cfg else self.embeds
        pooled = mx.concatenate([self.neg_pooled, self.pooled]) if cfg else self.pooled
        residuals = []
        for unit, model in zip(self.inputs, self.models()):
            if not unit.scale or not control_keep(step - self.first, self.steps, unit.start, unit.end):
                continue  # diffusers runs it at scale 0: residuals of zeros
            control = mx.broadcast_to(unit.latents, (x_in.shape[0], *unit.latents.shape[1:]))
            residuals.append(model(
                x_in, control, timestep, mx.zeros_like(pooled) if unit.config.force_zeros_for_pooled_projection
                else pooled, context if unit.config.joint_attention_dim else None, unit.scale, self.patch_embed()))
        return {"controlnet_residuals": combine_residuals(residuals)} if residuals else {}

    def after_step(self, state) -> mx.array | None:
        return None

    def release(self) -> None:
        self._models = None


class InpaintConditioning:
    """StableDiffusion3InpaintPipeline's semantics: start from the image's latents noised to the `strength`
    level, and after each step keep the unmasked latents on the image's noising path (the same noise)."""

    def __init__(self, image_latents: mx.array, mask: mx.array, strength: float):
        self.image_latents, self.mask, self.strength = image_latents, mask, strength
        self.noise: mx.array | None = None

    def prepare(self, x: mx.array, sigmas: np.ndarray, start: int) -> tuple[mx.array, int]:
        self.noise = x
        return noised(self.image_latents, x, float(sigmas[start])), start

    def transformer_inputs(self, x_in: mx.array, timestep: mx.array, step: int, cfg: bool) -> dict:
        return {}

    def after_step(self, state) -> mx.array:
        return blend(state.x_next, self.image_latents, self.noise, self.mask, state.sigma_next)

    def release(self) -> None:
        self.noise = None
