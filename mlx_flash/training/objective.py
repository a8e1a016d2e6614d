"""SD3's rectified-flow objective: noise levels drawn logit-normal and shifted, the velocity `noise - x0` at
`x_s = (1 - s) x0 + s noise` regressed with a mean squared error."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..sampler import NUM_TRAIN_TIMESTEPS, shifted


def sample_sigmas(normal: mx.array, shift: float, mean: float = 0.0, std: float = 1.0) -> mx.array:
    """Noise levels from standard normal draws: sigmoid(mean + std * normal) (SD3's logit-normal sampling),
    then SD3's timestep shift."""
    logits = normal if (mean, std) == (0.0, 1.0) else mean + std * normal
    return shifted(mx.sigmoid(logits), shift)


def flow_loss(model: nn.Module, x0: mx.array, noise: mx.array, sigmas: mx.array, embeds: mx.array,
              pooled: mx.array, weights: mx.array | None = None) -> mx.array:
    """Mean squared error of the predicted velocity against `noise - x0` at `(1 - s) x0 + s noise`; with
    `weights` (B,), each image's mean error is weighted (DreamBooth prior preservation) and summed / B."""
    s = sigmas[:, None, None, None]
    v = model((1 - s) * x0 + s * noise, sigmas * NUM_TRAIN_TIMESTEPS, embeds, pooled)
    error = (v.astype(mx.float32) - (noise - x0)) ** 2
    if weights is None:
        return error.mean()
    return (error.mean(axis=(1, 2, 3)) * weights).mean()
