"""ControlNets as diffusers' StableDiffusion3ControlNetPipeline (and its inpainting variant) runs them: each
ControlNet sees the transformer's input batch and its VAE-encoded control image, acts between its start and end
fractions of the steps at its scale, and the residuals of all of them, summed, go to the transformer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from ..controlnet import ControlNet, ControlNetConfig, combine_residuals
from ..denoise import Conditioning, Prompts
from ..inpaint import latent_mask
from ..mmdit import PatchEmbed

Encode = Callable[[mx.array], mx.array]  # pixels (1, H, W, 3) in [-1, 1] -> VAE posterior mean (1, h, w, 16)


def control_keep(step: int, steps: int, start: float, end: float) -> bool:
    """Whether a ControlNet acts at `step` (0-based) of the `steps` run, given its start and end fractions
    (diffusers' controlnet_keep)."""
    return not (step / steps < start or (step + 1) / steps > end)


@dataclass
class ControlInput:
    """One ControlNet of a run: its model (loaded on first use), its control image (1, H, W, 3) in [-1, 1], for
    the inpainting ControlNet also the mask (1, H, W, 1) (1 = repaint), its scale and its active fractions."""

    load: Callable[[], ControlNet]
    config: ControlNetConfig
    pixels: mx.array
    mask: np.ndarray | None = None
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


class ControlNets(Conditioning):
    """Adds the ControlNets' summed residuals (diffusers' SD3MultiControlNetModel) to each transformer call.

    `encode` gives the VAE's posterior mean (where diffusers draws a sample); `scale` and `shift` are the VAE's
    scaling and shift factors; `patch_embed` gives the transformer's position embedding, which ControlNets without
    their own (SD3.5 Large's) use."""

    def __init__(self, inputs: Sequence[ControlInput], prompts: Prompts, encode: Encode, scale: float,
                 shift: float, patch_embed: Callable[[], PatchEmbed]):
        self.inputs, self.prompts, self.patch_embed = list(inputs), prompts, patch_embed
        self.encode, self.vae_scale, self.vae_shift = encode, scale, shift
        self.latents: list[mx.array] = []
        self.models: list[ControlNet] | None = None
        self.first, self.steps = 0, 1

    def control_latents(self, unit: ControlInput) -> mx.array:
        """What a ControlNet sees of its control image: its latents, shifted unless the ControlNet forces zero
        pooled projections (StableDiffusion3ControlNetPipeline); for the inpainting ControlNet, the latents of
        the image with the masked pixels black and the mask of what to keep (the inpainting pipeline)."""
        if unit.mask is None:
            shift = 0.0 if unit.config.force_zeros_for_pooled_projection else self.vae_shift
            return (self.encode(unit.pixels) - shift) * self.vae_scale
        masked = mx.where(mx.array(unit.mask) > 0.5, -1.0, unit.pixels)
        latents = (self.encode(masked) - self.vae_shift) * self.vae_scale
        keep = 1 - latent_mask(unit.mask, unit.pixels.shape[1] // latents.shape[1]).astype(latents.dtype)
        return mx.concatenate([latents, keep], axis=-1)

    def prepare(self, x: mx.array, sigmas: np.ndarray, start: int) -> tuple[mx.array, int]:
        self.first, self.steps = start, len(sigmas) - 1 - start
        self.latents = [self.control_latents(unit) for unit in self.inputs]
        mx.eval(self.latents)
        return x, start

    def transformer_inputs(self, x_in: mx.array, timestep: mx.array, step: int, cfg: bool) -> dict:
        p = self.prompts
        context = mx.concatenate([p.negative_embeds, p.embeds]) if cfg else p.embeds
        pooled = mx.concatenate([p.negative_pooled, p.pooled]) if cfg else p.pooled
        if self.models is None:
            self.models = [unit.load() for unit in self.inputs]
        residuals = []
        for unit, model, latents in zip(self.inputs, self.models, self.latents):
            if not unit.scale or not control_keep(step - self.first, self.steps, unit.start, unit.end):
                continue  # diffusers runs it at scale 0, adding residuals of zeros
            control = mx.broadcast_to(latents, (x_in.shape[0], *latents.shape[1:]))
            zeros = unit.config.force_zeros_for_pooled_projection
            residuals.append(model(x_in, control, timestep, mx.zeros_like(pooled) if zeros else pooled,
                                   context if unit.config.joint_attention_dim else None, unit.scale,
                                   self.patch_embed()))
        return {"controlnet_residuals": combine_residuals(residuals)} if residuals else {}

    def release(self) -> None:
        self.models, self.latents = None, []
