"""Inpainting as diffusers' StableDiffusion3InpaintPipeline runs it: img2img whose unmasked latents are put back
on the image's noising path (with the run's own noise) after every step."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import numpy as np

from ..denoise import StepState
from ..inpaint import blend
from .img2img import Img2Img


class Inpaint(Img2Img):
    """img2img of `pixels` that repaints only where `mask` (1, h, w, 1), at latent resolution, is 1."""

    def __init__(self, pixels: mx.array, strength: float, encode: Callable[[mx.array], mx.array], mask: mx.array):
        super().__init__(pixels, strength, encode)
        self.mask = mask
        self.noise: mx.array | None = None

    def prepare(self, x: mx.array, sigmas: np.ndarray, start: int) -> tuple[mx.array, int]:
        self.noise = x
        return super().prepare(x, sigmas, start)

    def after_step(self, state: StepState) -> mx.array:
        return blend(state.x_next, self.latents, self.noise, self.mask, state.sigma_next).astype(state.x_next.dtype)

    def release(self) -> None:
        self.noise = self.latents = None
