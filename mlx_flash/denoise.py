"""The denoising loop and its two seams: conditionings change the numbers, callbacks watch them.

A step of the loop asks the sampler for new latents; the sampler evaluates the guided velocity (classifier-free
guidance, skip-layer guidance and each conditioning's extra transformer inputs are applied here), then each
conditioning may replace the latents and each callback sees the step's `StepState`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import numpy as np

from . import sampler as schedule
from .mmdit import MMDiT
from .presets import SkipLayerGuidance
from .samplers import Noise, Sampler

PRECOMPUTE_MAX_STEPS = 8  # runs this short (without CFG) precompute every adaLN modulation up front


class GenerationStopped(Exception):
    """A callback stopped the run; nothing was decoded."""


class NonFiniteError(ValueError):
    """NaN or infinite values appeared in a stage's output."""


def check_finite(value: mx.array, where: str) -> None:
    """Raise NonFiniteError naming `where` unless every element of `value` is finite."""
    if not mx.all(mx.isfinite(value)).item():
        raise NonFiniteError(f"{where} produced NaN or infinite values; no image was written (check the "
                             "weights and inputs, or use float32 / bfloat16 instead of float16).")


@dataclass(frozen=True)
class StepState:
    """One finished step: where it started, what the model predicted, where it ended."""

    index: int  # step index in the full schedule (img2img starts later)
    num_steps: int  # steps of the full schedule
    sigma: float
    sigma_next: float
    timestep: float  # as the transformer sees it (`sampler.timestep(sigma)`: sigma * 1000, dpm++2m its integer)
    x: mx.array  # latents before the step, (B, H/8, W/8, 16)
    v: mx.array  # guided velocity
    x0: mx.array  # clean-image estimate x - sigma * v
    x_next: mx.array  # latents after the step (after the conditionings)


class Conditioning:
    """Changes the numbers of a run (img2img, inpainting, ControlNet). Every method defaults to no change."""

    def prepare(self, x: mx.array, sigmas: np.ndarray, start: int) -> tuple[mx.array, int]:
        """The initial latents and the first step, given the seeded noise `x` and the first step so far."""
        return x, start

    def transformer_inputs(self, x_in: mx.array, timestep: mx.array, step: int, cfg: bool) -> dict:
        """Extra keyword arguments of this step's transformer call, for the batch `x_in` actually fed to it
        (with CFG the unconditional half first, then the conditional half)."""
        return {}

    def after_step(self, state: StepState) -> mx.array | None:
        """Replacement latents after a step, or None to keep `state.x_next`."""
        return None

    def release(self) -> None:
        """Free any model this conditioning loaded."""


class Callback:
    """Observes a run. `on_step` returning False stops it after that step."""

    def on_start(self, num_steps: int, start: int) -> None:
        """Before the first step: the schedule's length and the first step's index."""

    def on_step(self, state: StepState) -> bool | None:
        """After each step."""
        return None

    def on_end(self) -> None:
        """After the last step (also when the run stopped or failed)."""


@dataclass(frozen=True)
class Prompts:
    """Encoded prompts: conditional embeddings and, with classifier-free guidance, the negative ones."""

    embeds: mx.array
    pooled: mx.array
    negative_embeds: mx.array | None = None
    negative_pooled: mx.array | None = None

    @property
    def cfg(self) -> bool:
        return self.negative_embeds is not None


def seeded_noise(seeds: Sequence[int]) -> Noise:
    """Noise for stochastic samplers: draw `d` of image b comes from image b's own seed, so a run reproduces
    and image b does not depend on the batch it is in. Draws use keys split off the seed's key, never the
    key of the initial noise itself."""

    def noise(draw: int, shape: tuple[int, ...]) -> mx.array:
        keys = [mx.random.split(mx.random.key(s), draw + 2)[draw + 1] for s in seeds]
        return mx.stack([mx.random.normal(shape, key=k) for k in keys])

    return noise


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> mx.array:
    """The initial latents of a run: image b is standard normal noise of `shape` (H, W, C) from seed b."""
    return mx.stack([mx.random.normal(shape, key=mx.random.key(s)) for s in seeds])


def denoise(
    model: MMDiT,
    x: mx.array,
    sigmas: np.ndarray,
    start: int,
    prompts: Prompts,
    *,
    sampler: Sampler,
    noise: Noise,
    guidance: float = 1.0,
    skip_layer_guidance: SkipLayerGuidance | None = None,
    conditionings: Sequence[Conditioning] = (),
    callbacks: Sequence[Callback] = (),
    precompute_modulation: bool = False,
    drop_modulation_weights: bool = False,
) -> mx.array:
    """Run steps `start` .. end of the schedule `sigmas` (terminal 0 included) from latents `x`; return the
    final latents. `precompute_modulation` computes every adaLN vector up front (few-step runs without CFG:
    they depend only on t and the pooled prompt); `drop_modulation_weights` then frees their weights."""
    steps = len(sigmas) - 1
    if prompts.cfg:  # unconditional and conditional halves in one batch
        context = mx.concatenate([prompts.negative_embeds, prompts.embeds])
        pooled = mx.concatenate([prompts.negative_pooled, prompts.pooled])
    else:
        context, pooled = prompts.embeds, prompts.pooled
    slg = skip_layer_guidance if prompts.cfg else None

    timestep = sampler.timestep
    modulations: dict[float, list] = {}
    if precompute_modulation:
        modulations = model.modulations([timestep(s) for s in sampler.evaluated_sigmas(sigmas, start)], pooled)
        mx.eval(modulations)
        if drop_modulation_weights:
            model.drop_modulation_weights()
            mx.clear_cache()

    def velocity(x: mx.array, sigma: float, i: int) -> mx.array:
        t_value = timestep(sigma)
        t = mx.full((context.shape[0],), t_value)
        x_in = mx.concatenate([x, x]) if prompts.cfg else x
        extra = {}
        for conditioning in conditionings:
            extra.update(conditioning.transformer_inputs(x_in, t, i, prompts.cfg))
        v = model(x_in, t, context, pooled, modulation=modulations.get(t_value), **extra)
        if not prompts.cfg:
            return v
        v_uncond, v_cond = mx.split(v, 2)
        v = schedule.guidance(v_cond, v_uncond, guidance)
        if slg is not None and schedule.slg_active(i, steps, slg.start, slg.stop):
            v_skip = model(x, t[: x.shape[0]], prompts.embeds, prompts.pooled, skip_layers=slg.layers)
            v = schedule.skip_layer_guidance(v, v_cond, v_skip, slg.scale)
        return v

    for callback in callbacks:
        callback.on_start(steps, start)
    try:
        for i in range(start, steps):
            x_next, v, x0 = sampler.step(velocity, x, i, sigmas, noise)
            state = StepState(i, steps, float(sigmas[i]), float(sigmas[i + 1]), timestep(sigmas[i]), x, v, x0, x_next)
            for conditioning in conditionings:
                replaced = conditioning.after_step(state)
                if replaced is not None:
                    state = StepState(**{**vars(state), "x_next": replaced})
            mx.eval(state.x_next)
            check_finite(state.x_next, f"the transformer (step {i + 1} of {steps})")
            x = state.x_next
            # Every callback sees the step, even when an earlier one asks to stop.
            if False in [callback.on_step(state) for callback in callbacks]:
                raise GenerationStopped(f"stopped after step {i + 1} of {steps}")
    finally:
        for callback in callbacks:
            callback.on_end()
    return x
