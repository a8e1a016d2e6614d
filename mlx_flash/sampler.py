"""Flow-matching schedule math, as diffusers' FlowMatchEulerDiscreteScheduler and the SD3 pipelines compute it:
noise levels, timesteps, img2img start, noising, the Euler step and guidance (the samplers in samplers.py and the
training scripts share these).

The schedule is computed in NumPy along diffusers' own dtype path (float32 training table, float64 inference
spacing, float32 result), so sigmas and timesteps are bit-identical to the reference.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000


def shifted(sigmas, shift: float):
    """SD3's timestep shift of noise levels (numpy or MLX arrays): more of them near pure noise for shift > 1."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(num_steps: int, shift: float = 3.0, sigmas: Sequence[float] | None = None) -> np.ndarray:
    """Noise levels of a `num_steps` run, float32, with the terminal 0 appended (length `num_steps + 1`).

    `sigmas`, if given, replaces the default linear spacing (diffusers shifts custom sigmas too) and must
    hold `num_steps` strictly decreasing values in (0, 1].
    """
    check_steps(num_steps)
    if sigmas is not None:
        out = shifted(check_sigmas(sigmas, num_steps), shift).astype(np.float32)
    else:
        # The scheduler's training table is float32; only its end points enter the inference spacing.
        train = np.float32([1, NUM_TRAIN_TIMESTEPS]) / NUM_TRAIN_TIMESTEPS
        sigma_min, sigma_max = (float(s) for s in shifted(train, shift))
        t = np.linspace(sigma_max * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, num_steps)
        out = shifted(t / NUM_TRAIN_TIMESTEPS, shift).astype(np.float32)
    return np.append(out, np.float32(0))


def check_steps(num_steps: int) -> None:
    """Raise ValueError unless `num_steps` is a positive integer."""
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer (got {num_steps!r}); pass e.g. 4 or 28.")


def check_sigmas(sigmas: Sequence[float], num_steps: int) -> np.ndarray:
    """Custom noise levels as float32, after checking there is one per step, each in (0, 1], strictly decreasing."""
    values = np.array(list(sigmas), dtype=np.float64)
    if values.ndim != 1 or len(values) != num_steps:
        raise ValueError(f"got {len(values)} custom sigmas for {num_steps} steps; pass exactly one sigma per step "
                         "(the terminal 0 is implied).")
    if not np.all((values > 0) & (values <= 1)):
        raise ValueError(f"custom sigmas must lie in (0, 1] (got {values.tolist()}); the terminal 0 is implied.")
    if np.any(np.diff(values) >= 0):
        raise ValueError(f"custom sigmas must be strictly decreasing (got {values.tolist()}); e.g. 1,0.75,0.5,0.25.")
    return np.array(list(sigmas)).astype(np.float32)


def flow_timesteps(sigmas: np.ndarray) -> np.ndarray:
    """The timesteps fed to the transformer, `sigma * 1000` in float32 (one per step, terminal 0 dropped)."""
    return sigmas[:-1].astype(np.float32) * np.float32(NUM_TRAIN_TIMESTEPS)


def img2img_start(num_steps: int, strength: float) -> int:
    """Index of the first step an img2img run takes: it denoises `sigmas[start:]`, from `sigmas[start]`."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1] (got {strength}); use e.g. 0.6, or 1.0 to ignore the image.")
    start = int(max(num_steps - min(num_steps * strength, num_steps), 0))
    if start >= num_steps:
        raise ValueError(
            f"strength {strength} with {num_steps} steps leaves no denoising step; "
            f"raise strength to at least {1 / num_steps:g} or use more steps."
        )
    return start


def add_noise(init_latents: mx.array, noise: mx.array, sigma: float) -> mx.array:
    """Noise clean latents to level `sigma`: `sigma * noise + (1 - sigma) * init` (diffusers' `scale_noise`)."""
    s = mx.array(sigma, dtype=init_latents.dtype)
    return s * noise + (1 - s) * init_latents


def euler_step(x: mx.array, v: mx.array, sigma: float, sigma_next: float) -> mx.array:
    """One Euler step `x + (sigma_next - sigma) * v`, in float32 and returned in `v`'s dtype (as diffusers)."""
    dt = float(np.float32(sigma_next) - np.float32(sigma))
    # A Python scalar takes v's dtype, as torch's 0-d float32 dt does: dt * v is computed in v's precision.
    return (x.astype(mx.float32) + dt * v).astype(v.dtype)


def guidance(v_cond: mx.array, v_uncond: mx.array, scale: float) -> mx.array:
    """Classifier-free guidance: `v_uncond + scale * (v_cond - v_uncond)`."""
    return v_uncond + scale * (v_cond - v_uncond)


def skip_layer_guidance(v: mx.array, v_cond: mx.array, v_skip: mx.array, scale: float) -> mx.array:
    """Add skip-layer guidance to the guided `v`: `v + (v_cond - v_skip) * scale`."""
    return v + (v_cond - v_skip) * scale


def slg_active(step: int, num_steps: int, start: float, stop: float) -> bool:
    """Whether skip-layer guidance runs at step index `step` (0-based): `start * N < step < stop * N`.

    Both bounds are exclusive and `N` is the run's step count, as in diffusers' StableDiffusion3Pipeline
    (which applies it only together with classifier-free guidance).
    """
    return num_steps * start < step < num_steps * stop
