"""Weight-free previews: a linear map of each latent pixel to RGB (a 16 -> 3 matrix and a bias), as image
generators show while sampling.

The map takes diffusion-space latents (as the transformer produces them, e.g. a step's x0 estimate) to RGB in
[-1, 1], the range of `Autoencoder.latents_to_image`, at latent resolution. SD3 / SD3.5's VAE has published
factors (`SD3_LATENT_RGB`); for another VAE, `fit_latent_rgb` fits them by least squares to its decodes, and a
model folder stores them in its manifest (mlx_flash.json) as {"latent_rgb": {"weight": [[r, g, b], ...one row
per latent channel], "bias": [r, g, b]}}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import mlx.core as mx
import numpy as np

from .vae import Autoencoder, VAEConfig, sd3_latents

MANIFEST_KEY = "latent_rgb"


@dataclass(frozen=True)
class LatentRGB:
    """rgb = latent @ weight + bias, per latent pixel; weight (latent_channels, 3), bias (3,); rgb in [-1, 1]."""

    weight: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float]

    def __post_init__(self):
        if any(len(row) != 3 for row in self.weight) or len(self.bias) != 3:
            raise ValueError("latent_rgb: need a weight of one [r, g, b] row per latent channel and a bias [r, g, b].")

    @classmethod
    def from_dict(cls, data: Mapping) -> LatentRGB:
        """From a manifest's {"weight": [[r, g, b], ...], "bias": [r, g, b]}."""
        try:
            return cls(tuple(tuple(float(v) for v in row) for row in data["weight"]),
                       tuple(float(v) for v in data["bias"]))
        except (KeyError, TypeError) as err:
            raise ValueError(f"latent_rgb: expected {{'weight': [[r, g, b], ...], 'bias': [r, g, b]}} ({err}); "
                             "refit it with mlx_flash.preview.fit_latent_rgb.") from None

    def to_dict(self) -> dict:
        return {"weight": [list(row) for row in self.weight], "bias": list(self.bias)}


# SD3's VAE (also SD3.5's): the factors ComfyUI publishes for it (comfy/latent_formats.py, class SD3,
# latent_rgb_factors and latent_rgb_factors_bias), which it applies to model-space x0 and reads as RGB in [-1, 1].
SD3_LATENT_RGB = LatentRGB(
    weight=(
        (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
        (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
        (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
        (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293), (-0.1448, -0.1463, -0.1189),
    ),
    bias=(0.2394, 0.2135, 0.1925),
)


def latent_preview(latents: mx.array, factors: LatentRGB, upscale: int = 1) -> mx.array:
    """Diffusion-space latents (B, h, w, C) -> float32 RGB previews (B, h * upscale, w * upscale, 3) in [0, 1]
    (nearest-neighbour upscaling)."""
    weight, bias = mx.array(factors.weight), mx.array(factors.bias)
    if latents.ndim != 4 or latents.shape[-1] != weight.shape[0]:
        raise ValueError(f"latent preview: expected latents (batch, height, width, {weight.shape[0]}) (NHWC), got "
                         f"{tuple(latents.shape)}; the factors are for {weight.shape[0]} latent channels.")
    rgb = mx.clip((latents.astype(mx.float32) @ weight + bias + 1) / 2, 0.0, 1.0)
    if upscale > 1:
        rgb = mx.repeat(mx.repeat(rgb, upscale, axis=1), upscale, axis=2)
    return rgb


def fit_latent_rgb(vae: Autoencoder, latents: mx.array) -> LatentRGB:
    """Least-squares factors for `vae`: the affine map from each latent pixel of `latents` (diffusion space,
    (B, h, w, C)) to the mean colour of the f x f block of its decode (clipped to [-1, 1]) that it covers."""
    f = vae.config.factor
    images = np.clip(np.array(vae.latents_to_image(latents, tiled=False)), -1, 1)
    b, h, w, _ = latents.shape
    blocks = images.reshape(b, h, f, w, f, 3).mean(axis=(2, 4)).reshape(-1, 3)
    x = np.array(latents, dtype=np.float64).reshape(-1, latents.shape[-1])
    solution, *_ = np.linalg.lstsq(np.concatenate([x, np.ones((len(x), 1))], axis=1), blocks, rcond=None)
    return LatentRGB(tuple(tuple(round(float(v), 5) for v in row) for row in solution[:-1]),
                     tuple(round(float(v), 5) for v in solution[-1]))


def model_latent_rgb(manifest: Mapping, vae_config: VAEConfig) -> LatentRGB | None:
    """A model's preview factors: its manifest's "latent_rgb" if it has one, else SD3's when the VAE is SD3's
    (16 channels, SD3's scaling and shift), else None."""
    if MANIFEST_KEY in manifest:
        return LatentRGB.from_dict(manifest[MANIFEST_KEY])
    return SD3_LATENT_RGB if sd3_latents(vae_config) else None
