"""The objectives of SD3.5-Flash's distillation, each a plain function of arrays (see docs in distill.py):

- distribution matching (DMD): the KL gradient between the student's distribution and the teacher's is
  `s_fake - s_real` (the scores of the noised distributions); in a rectified flow, where x0 = x_t - t v and the
  score is -(x_t + (1 - t) v) / t, it is proportional to `x0_fake - x0_real`, which the surrogate loss
  `0.5 * |x0 - sg(x0 - g)|^2` pushes through the student's output x0;
- timestep sharing: the points where it is taken are the student's own trajectory points (its few-step Euler
  sampler run from the noise), at the student's timesteps;
- trajectory guidance (auxiliary): the student's step from such a point regressed onto the teacher's ODE
  solution over the same step;
- an adversarial loss on a small head over a transformer block's image tokens (non-saturating or hinge);
- split-timestep fine-tuning's merge: weight interpolation of two branches (exact, also for LoRAs).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np
from mlx import nn

from .. import sampler
from ..mmdit import MMDiT
from ..samplers import Euler

GAN_LOSSES = ("non-saturating", "hinge")


def guided_velocity(model: MMDiT, x: mx.array, timesteps: mx.array, embeds: mx.array, pooled: mx.array,
                    negative_embeds: mx.array, negative_pooled: mx.array, guidance: float) -> mx.array:
    """The velocity with classifier-free guidance folded in, as the pipeline computes it (uncond half first)."""
    if guidance == 1.0:
        return model(x, timesteps, embeds, pooled)
    v_uncond, v_cond = mx.split(model(mx.concatenate([x, x]), mx.concatenate([timesteps, timesteps]),
                                      mx.concatenate([negative_embeds, embeds]),
                                      mx.concatenate([negative_pooled, pooled])), 2)
    return sampler.guidance(v_cond, v_uncond, guidance)


def trajectory_point(velocity: Callable[[mx.array, float, int], mx.array], noise: mx.array, sigmas: np.ndarray,
                     k: int) -> mx.array:
    """The latents the student's few-step Euler sampler reaches after `k` steps of `sigmas` from `noise`
    (the point its step k starts from, at noise level sigmas[k]); no gradient flows through it."""
    euler, x = Euler(), noise
    for i in range(k):
        x, _, _ = euler.step(velocity, x, i, sigmas, None)
        mx.eval(x)
    return mx.stop_gradient(x)


def segment_velocity(velocity: Callable[[mx.array, float, int], mx.array], x: mx.array, sigma_from: float,
                     sigma_to: float, substeps: int) -> mx.array:
    """The mean velocity (x' - x) / (sigma_to - sigma_from) of the ODE `velocity` from x at sigma_from, x' its
    solution at sigma_to by `substeps` Euler steps evenly spaced in sigma: where the teacher's trajectory takes
    x over the student's step (the target of trajectory guidance); no gradient flows through it."""
    sigmas = np.linspace(sigma_from, sigma_to, substeps + 1)
    return mx.stop_gradient((trajectory_point(velocity, x, sigmas, substeps) - x) / (sigma_to - sigma_from))


def trajectory_loss(v_student: mx.array, v_target: mx.array) -> mx.array:
    """Trajectory guidance: mean |v_student - v_target|^2, the student's step regressed onto the teacher's."""
    return ((v_student.astype(mx.float32) - v_target) ** 2).mean()


def dm_gradient(x0: mx.array, x_t: mx.array, sigmas: mx.array, v_real: mx.array, v_fake: mx.array) -> mx.array:
    """DMD's gradient on the student's output x0 from the scores at (x_t, sigma): x0_fake - x0_real, divided
    per image by mean |x0 - x0_real| (DMD's normaliser); equal to t^2 / (1 - t) (s_fake - s_real) / normaliser."""
    s = sigmas[:, None, None, None]
    x0_real, x0_fake = x_t - s * v_real, x_t - s * v_fake
    scale = mx.maximum(mx.abs(x0 - x0_real).mean(axis=(1, 2, 3), keepdims=True), 1e-6)
    return mx.stop_gradient((x0_fake - x0_real) / scale)


def dm_loss(x0: mx.array, gradient: mx.array) -> mx.array:
    """The surrogate whose gradient with respect to x0 is `gradient / x0.size`: 0.5 * mean |x0 - sg(x0 - g)|^2."""
    target = mx.stop_gradient(x0 - gradient)
    return 0.5 * ((x0.astype(mx.float32) - target) ** 2).mean()


def block_features(model: MMDiT, x: mx.array, timesteps: mx.array, context: mx.array, pooled: mx.array,
                   block: int) -> mx.array:
    """The image tokens (B, L, hidden) after transformer block `block`, as the model's forward computes them (with
    its gradient checkpointing: in training each block keeps only its inputs for the backward)."""
    if not 0 <= block < model.config.num_layers:
        raise ValueError(f"feature block {block} does not exist; the transformer has blocks 0-"
                         f"{model.config.num_layers - 1}.")
    dtype = model.compute_dtype
    *mods, _ = model.modulation(timesteps, pooled)
    h, c = model.pos_embed(x.astype(dtype)), model.context_embedder(context.astype(dtype))
    for layer, mod in zip(model.transformer_blocks[: block + 1], mods):
        run = nn.utils.checkpoint(layer) if model.gradient_checkpointing else layer  # as the forward does
        c, h = run(h, c, mod)
    return h


class DiscriminatorHead(nn.Module):
    """A small discriminator on a block's image tokens: layer norm, an MLP per token, the mean logit (B,)."""

    def __init__(self, dim: int, hidden: int = 64, key: mx.array | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        if key is not None:  # nn.Linear's initialisation, uniform in +-1/sqrt(in), drawn from `key`
            for layer, k in zip((self.fc1, self.fc2), mx.random.split(key)):
                bound, (kw, kb) = layer.weight.shape[1] ** -0.5, mx.random.split(k)
                layer.weight = mx.random.uniform(-bound, bound, layer.weight.shape, key=kw)
                layer.bias = mx.random.uniform(-bound, bound, layer.bias.shape, key=kb)

    def __call__(self, features: mx.array) -> mx.array:
        return self.fc2(nn.silu(self.fc1(self.norm(features.astype(mx.float32))))).mean(axis=(1, 2))


def _check_kind(kind: str) -> None:
    if kind not in GAN_LOSSES:
        raise ValueError(f"unknown adversarial loss {kind!r}; use one of {', '.join(GAN_LOSSES)}.")


def discriminator_loss(real: mx.array, fake: mx.array, kind: str = "non-saturating") -> mx.array:
    """The head's loss on real and fake logits: non-saturating -log sigmoid(real) - log(1 - sigmoid(fake)),
    or hinge relu(1 - real) + relu(1 + fake); means over the batch."""
    _check_kind(kind)
    if kind == "hinge":
        return nn.relu(1 - real).mean() + nn.relu(1 + fake).mean()
    return mx.logaddexp(0.0, -real).mean() + mx.logaddexp(0.0, fake).mean()


def generator_loss(fake: mx.array, kind: str = "non-saturating") -> mx.array:
    """The student's adversarial loss on the fake logits: -log sigmoid(fake) (non-saturating) or -fake (hinge)."""
    _check_kind(kind)
    return -fake.mean() if kind == "hinge" else mx.logaddexp(0.0, -fake).mean()


def interpolate(high: dict, low: dict, ratio: float) -> dict:
    """Weight interpolation of two branches' (flattened) weights: ratio * high + (1 - ratio) * low."""
    return {k: ratio * high[k] + (1 - ratio) * low[k] for k in high}


def merge_adapters(high: dict, low: dict, ratio: float) -> dict:
    """One adapter {"down", "up"} of twice the rank whose update is ratio * high's + (1 - ratio) * low's (at the
    same scale): per part, the downs stacked and the ups side by side, scaled by ratio and 1 - ratio."""
    parts = high["up"].shape[0]
    downs_h, downs_l = mx.split(high["down"], parts), mx.split(low["down"], parts)
    down = mx.concatenate([mx.concatenate([h, l]) for h, l in zip(downs_h, downs_l)])
    up = mx.concatenate([ratio * high["up"], (1 - ratio) * low["up"]], axis=-1)
    return {"down": down, "up": up}
