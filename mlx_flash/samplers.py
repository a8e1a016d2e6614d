"""Flow-matching samplers: one object per run, `step` advances the latents by one step of its schedule."""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import mlx.core as mx
import numpy as np

from . import sampler

Velocity = Callable[[mx.array, float, int], mx.array]  # (x, sigma, step index) -> guided velocity
Noise = Callable[[int, tuple[int, ...]], mx.array]  # (draw index, one image's latent shape) -> seeded noise batch


class Sampler(Protocol):
    """A sampler of one run: its noise levels, and one step of them."""

    name: str

    def sigmas(self, num_steps: int, shift: float, sigmas: Sequence[float] | None = None) -> np.ndarray:
        """The run's noise levels, terminal 0 included."""

    def step(self, velocity: Velocity, x: mx.array, i: int, sigmas: np.ndarray,
             noise: Noise) -> tuple[mx.array, mx.array, mx.array]:
        """(latents after step i, the velocity of the step, the clean-image estimate x0)."""


class Euler:
    """diffusers' FlowMatchEulerDiscreteScheduler: `x + (sigma_next - sigma) * v`."""

    name = "euler"

    def sigmas(self, num_steps: int, shift: float, sigmas: Sequence[float] | None = None) -> np.ndarray:
        return sampler.flow_sigmas(num_steps, shift, None if sigmas is None else list(sigmas))

    def step(self, velocity: Velocity, x: mx.array, i: int, sigmas: np.ndarray,
             noise: Noise) -> tuple[mx.array, mx.array, mx.array]:
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        v = velocity(x, sigma, i)
        return sampler.euler_step(x, v, sigma, sigma_next), v, x - sigma * v


SAMPLERS = {"euler": Euler}


def make_sampler(name: str = "euler", **options) -> Sampler:
    """A fresh sampler of kind `name` (one per run: multistep samplers keep state)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}.")
    return SAMPLERS[name](**options)
