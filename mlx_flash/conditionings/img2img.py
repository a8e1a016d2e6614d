"""img2img as diffusers' StableDiffusion3Img2ImgPipeline runs it: the image's latents noised to the first step."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import numpy as np

from .. import sampler
from ..denoise import Conditioning


class Img2Img(Conditioning):
    """Start from `pixels` (1, H, W, 3) in [-1, 1], encoded by `encode` (pixels -> diffusion latents), noised
    to the level of the first of the last `strength` fraction of the steps."""

    def __init__(self, pixels: mx.array, strength: float, encode: Callable[[mx.array], mx.array]):
        self.pixels, self.strength, self.encode = pixels, strength, encode
        self.latents: mx.array | None = None  # the encoded image, once prepared

    def prepare(self, x: mx.array, sigmas: np.ndarray, start: int) -> tuple[mx.array, int]:
        first = max(start, sampler.img2img_start(len(sigmas) - 1, self.strength))
        self.latents = self.encode(self.pixels)
        return sampler.add_noise(mx.repeat(self.latents, x.shape[0], axis=0), x, float(sigmas[first])), first
