"""Flow-matching samplers: one object per run, `step` advances the latents by one step of its schedule.

Each follows its reference operation for operation (float32 arithmetic, the result in the velocity's dtype):
- `euler`: diffusers' FlowMatchEulerDiscreteScheduler;
- `euler-stochastic`: the same with `stochastic_sampling=True` (predict x0, re-noise to the next sigma);
- `heun`: FlowMatchHeunDiscreteScheduler (two velocity evaluations per step but the last);
- `dpm++2m`: DPMSolverMultistepScheduler as configured for flow models (use_flow_sigmas, flow_prediction,
  dpmsolver++ midpoint, order 2, first-order last step, final sigma 0; integer timesteps);
- `scale-wise`: SwD's inference loop (yandex-research/swd): predict x0, upsample it bicubically to the next
  step's latent size, re-noise to the next sigma.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from . import sampler
from .sampler import NUM_TRAIN_TIMESTEPS

Velocity = Callable[[mx.array, float, int], mx.array]  # (x, sigma, step index) -> guided velocity
Noise = Callable[[int, tuple[int, ...]], mx.array]  # (draw index, one image's latent shape) -> seeded noise batch


class Sampler:
    """Euler's schedule and timesteps; subclasses define `step` and may change the schedule or latent sizes."""

    name: str

    def sigmas(self, num_steps: int, shift: float, sigmas: Sequence[float] | None = None) -> np.ndarray:
        """Noise levels of a run, float32 with the terminal 0 appended; custom `sigmas` (one per step, strictly
        decreasing in (0, 1]) replace the default spacing and are shifted too, as diffusers does."""
        return sampler.flow_sigmas(num_steps, shift, sigmas)

    def timestep(self, sigma: float) -> float:
        """The transformer's timestep at noise level `sigma` (`sigma * 1000` in float32)."""
        return float(np.float32(sigma) * np.float32(NUM_TRAIN_TIMESTEPS))

    def evaluated_sigmas(self, sigmas: np.ndarray, start: int) -> np.ndarray:
        """The noise levels a run from step `start` evaluates the velocity at (Heun's second evaluations too)."""
        return sigmas[start:-1]

    def latent_size(self, i: int, size: tuple[int, int]) -> tuple[int, int]:
        """Latent (height, width) at step `i` of a run whose final latents are `size` (the same for all but
        scale-wise)."""
        return size

    def step(self, velocity: Velocity, x: mx.array, i: int, sigmas: np.ndarray,
             noise: Noise) -> tuple[mx.array, mx.array, mx.array]:
        """(latents after step `i`, the velocity the step used, the clean estimate x0)."""
        raise NotImplementedError  # the interface: every sampler in SAMPLERS defines its own step


class Euler(Sampler):
    """`x + (sigma_next - sigma) * v`."""

    name = "euler"

    def step(self, velocity, x, i, sigmas, noise):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        v = velocity(x, sigma, i)
        return sampler.euler_step(x, v, sigma, sigma_next), v, x - sigma * v


def renoise(x0: mx.array, sigma: float, noise: Noise, draw: int) -> mx.array:
    """`(1 - sigma) * x0 + sigma * n` with fresh noise n (float32); x0 itself at sigma 0, drawing nothing."""
    if sigma == 0:
        return x0
    n = noise(draw, tuple(x0.shape[1:])).astype(mx.float32)
    return float(np.float32(1) - np.float32(sigma)) * x0 + sigma * n


class EulerStochastic(Sampler):
    """Predict x0 = x - sigma * v, then re-noise it to the next sigma with noise draw `i + 1`."""

    name = "euler-stochastic"

    def step(self, velocity, x, i, sigmas, noise):
        sigma = float(sigmas[i])
        v = velocity(x, sigma, i)
        x0 = x.astype(mx.float32) - sigma * v
        return renoise(x0, float(sigmas[i + 1]), noise, i + 1).astype(v.dtype), v, x0


class Heun(Sampler):
    """Euler to the next sigma, a second velocity there, and the step redone with the mean of both slopes; the
    step to sigma 0 stays Euler. Returns the slope it used as the velocity."""

    name = "heun"

    def step(self, velocity, x, i, sigmas, noise):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        dt = float(np.float32(sigma_next) - np.float32(sigma))
        x32 = x.astype(mx.float32)
        v = velocity(x, sigma, i)
        slope = (x32 - (x32 - v * sigma)) / sigma  # diffusers' derivative, (x - denoised) / sigma
        if sigma_next != 0:
            x_mid = (x32 + slope * dt).astype(v.dtype)
            x_mid32 = x_mid.astype(mx.float32)
            v_mid = velocity(x_mid, sigma_next, i)
            slope = 0.5 * (slope + (x_mid32 - (x_mid32 - v_mid * sigma_next)) / sigma_next)
        return (x32 + slope * dt).astype(v.dtype), slope.astype(v.dtype), x32 - sigma * slope


def _log_snr(sigma: np.float32) -> np.float32:
    """DPM-Solver's lambda = log(alpha) - log(sigma) with flow alpha = 1 - sigma (inf at sigma 0)."""
    with np.errstate(divide="ignore"):
        return np.log(np.float32(1) - sigma) - np.log(sigma)


class DPMSolver2M(Sampler):
    """DPM-Solver++(2M) on x0 = x - sigma * v; the first step of a run and the last are first order."""

    name = "dpm++2m"

    def __init__(self):
        self._timesteps: dict[float, int] = {}
        self._previous: tuple[int, mx.array] | None = None  # (step index, x0) of the last step taken

    def sigmas(self, num_steps, shift, sigmas=None):
        """diffusers' flow sigmas `shift(1 - linspace(1, 1/1000, n + 1))` reversed, without the last (0), then
        0 appended; timesteps are `int(sigma * 1000)` of the float64 levels."""
        if sigmas is None:
            sampler.check_steps(num_steps)
            alphas = np.linspace(1, 1 / NUM_TRAIN_TIMESTEPS, num_steps + 1)
            levels = np.flip(sampler.shifted(1.0 - alphas, shift))[:-1].copy()
            table = np.append(levels, 0).astype(np.float32)
        else:
            table = sampler.flow_sigmas(num_steps, shift, sigmas)
            levels = table[:-1].astype(np.float64)
        self._timesteps = dict(zip(table[:-1].tolist(), (levels * NUM_TRAIN_TIMESTEPS).astype(np.int64).tolist()))
        return table

    def timestep(self, sigma):
        sigma = float(np.float32(sigma))
        return float(self._timesteps.get(sigma, int(sigma * NUM_TRAIN_TIMESTEPS)))

    def step(self, velocity, x, i, sigmas, noise):
        sigma = float(sigmas[i])
        v = velocity(x, sigma, i)
        x0 = x - sigma * v  # diffusers converts the output before casting the sample to float32
        previous, self._previous = self._previous, (i, x0)
        s_t, s_0 = np.float32(sigmas[i + 1]), np.float32(sigmas[i])
        h = _log_snr(s_t) - _log_snr(s_0)
        c = (np.float32(1) - s_t) * (np.exp(-h) - np.float32(1))  # alpha_t * (exp(-h) - 1)
        x_next = float(s_t / s_0) * x.astype(mx.float32) - float(c) * x0
        if previous is not None and previous[0] == i - 1 and i < len(sigmas) - 2:
            r0 = (_log_snr(s_0) - _log_snr(np.float32(sigmas[i - 1]))) / h
            x_next = x_next - float(np.float32(0.5) * c) * (float(np.float32(1) / r0) * (x0 - previous[1]))
        return x_next.astype(v.dtype), v, x0


def _cubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) weights of torch's bicubic resize (A = -0.75, align_corners=False, edges clamped)."""
    a = np.float32(-0.75)
    scale = np.float32(size_in) / np.float32(size_out)
    source = scale * (np.arange(size_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    base = np.floor(source)
    t = source - base

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    matrix = np.zeros((size_out, size_in), np.float32)
    for k, weight in enumerate((far(t + 1), near(t), near(1 - t), far(2 - t))):
        np.add.at(matrix, (np.arange(size_out), np.clip(base.astype(int) - 1 + k, 0, size_in - 1)), weight)
    return matrix


def resize_bicubic(x: mx.array, size: tuple[int, int]) -> mx.array:
    """Resize NHWC latents to `size` (height, width) as torch's `interpolate(mode="bicubic")` does."""
    rows = mx.array(_cubic_matrix(x.shape[1], size[0]))
    cols = mx.array(_cubic_matrix(x.shape[2], size[1]))
    return mx.einsum("ph,bhwc,qw->bpqc", rows, x.astype(mx.float32), cols)


class ScaleWise(Sampler):
    """SwD: at step i the latents have side `scales[i] / scales[-1]` of the final one; x0 is predicted, resized
    to the next step's size and re-noised to the next sigma (noise draw `i + 1`). Needs `sigmas`."""

    name = "scale-wise"

    def __init__(self, scales: Sequence[int] | None = None):
        if not scales or any(int(s) != s or s < 1 for s in scales) or list(scales) != sorted(scales):
            raise ValueError(f"the scale-wise sampler needs scales, increasing positive latent sides, one per step "
                             f"(got {scales!r}); use a scale-wise preset (e.g. swd-medium-6-steps).")
        self.scales = tuple(int(s) for s in scales)

    def sigmas(self, num_steps, shift, sigmas=None):
        if sigmas is None:
            raise ValueError("the scale-wise sampler needs sigmas, one per step; use its preset or pass --sigmas.")
        if len(self.scales) != num_steps:
            raise ValueError(f"the scale-wise sampler has {len(self.scales)} scales for {num_steps} steps; "
                             f"run {len(self.scales)} steps.")
        return sampler.flow_sigmas(num_steps, shift, sigmas)

    def latent_size(self, i, size):
        last = self.scales[-1]
        multiple = math.lcm(*(2 * last // math.gcd(s, 2 * last) for s in self.scales))  # every side even
        if size[0] % multiple or size[1] % multiple:
            raise ValueError(f"the scale-wise sampler needs image sides that are multiples of {8 * multiple} "
                             f"pixels (latent {size[1]}x{size[0]}); use e.g. {8 * last}x{8 * last}.")
        return (size[0] * self.scales[i] // last, size[1] * self.scales[i] // last)

    def step(self, velocity, x, i, sigmas, noise):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        v = velocity(x, sigma, i)
        x0 = x.astype(mx.float32) - sigma * v
        if sigma_next == 0:
            return x0.astype(v.dtype), v, x0
        final = tuple(n * self.scales[-1] // self.scales[i] for n in x.shape[1:3])
        size = self.latent_size(i + 1, final)
        resized = x0 if size == tuple(x.shape[1:3]) else resize_bicubic(x0, size)
        return renoise(resized, sigma_next, noise, i + 1).astype(v.dtype), v, x0


SAMPLERS: dict[str, type[Sampler]] = {s.name: s for s in (Euler, EulerStochastic, Heun, DPMSolver2M, ScaleWise)}


def make_sampler(name: str = "euler", **options) -> Sampler:
    """A fresh sampler of kind `name` (one per run: multistep samplers keep state); `options` go to its
    constructor (scale-wise: `scales`)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}.")
    cls = SAMPLERS[name]
    unknown = sorted(set(options) - set(inspect.signature(cls).parameters))
    if unknown:
        raise ValueError(f"sampler {name!r} takes no option {', '.join(unknown)}; drop it or choose another sampler.")
    return cls(**options)

