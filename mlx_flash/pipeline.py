"""Text (and optionally an image) in, images out: encode -> prepare -> denoise -> decode."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator, Sequence

import mlx.core as mx
import numpy as np

from . import memory
from .callbacks import ProgressBar
from .components import Components
from .conditionings.from_request import controlnet_conditioning, image_conditioning, paste_crops
from .denoise import (
    PRECOMPUTE_MAX_STEPS,
    Callback,
    Conditioning,
    Prompts,
    check_finite,
    denoise,
    initial_noise,
    seeded_noise,
)
from .image_io import numpy_to_pil
from .memory_plan import MemoryPlan, estimate_memory, plan_memory
from .presets import SkipLayerGuidance
from .request import GenerationRequest, GenerationResult, StageReport, resolve
from .sampler import img2img_start

log = logging.getLogger("mlx_flash")


class Pipeline(Components):
    """An SD3 / SD3.5 model ready to generate (its parts: `Components`). Calls are serialized: one Pipeline may
    be shared by threads, and nothing of one call leaks into the next."""

    def __init__(self, root: Path, **settings):
        """The arguments of `Components`."""
        super().__init__(root, **settings)
        self.stages: list[StageReport] = []  # the last run's reports (GenerationResult.stages is per call)
        self._lock = threading.RLock()

    def set_lora_scales(self, scales: Sequence[float]) -> None:
        """Change the LoRAs' scales (one per LoRA, in load order) without reloading; the next run uses them."""
        with self._lock:
            self.loras.set_scales(scales)

    def defaults(self) -> tuple[int, float, SkipLayerGuidance | None]:
        """(steps, guidance scale, skip-layer guidance) this model runs with unless told otherwise: the model
        folder's manifest, else its preset's published settings."""
        d = self.sampling_defaults()
        return d.steps, d.guidance, d.skip_layer_guidance

    def request(self, prompt: str | Sequence[str], **settings) -> GenerationRequest:
        """`prompt` and `generate`'s keyword arguments resolved against this model's defaults and checked."""
        return resolve(self.sampling_defaults(), prompt, **settings)

    def generate(
        self,
        prompt: str | Sequence[str],
        *,
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | Sequence[int] | None = None,
        latents: mx.array | np.ndarray | None = None,
        image=None,
        strength: float | None = None,
        num_images: int = 1,
        max_sequence_length: int | None = None,
        skip_layer_guidance: SkipLayerGuidance | bool | None = None,
        output_type: str = "pil",
        progress: bool = True,
        sampler: str | None = None,
        shift: float | None = None,
        sigmas: Sequence[float] | None = None,
        vae: str = "full",
        callbacks: Sequence[Callback] = (),
        control_image=None,
        control_type: str | None = None,
        control_start: float | Sequence[float] | None = None,
        control_end: float | Sequence[float] | None = None,
        mask=None,
        mask_blur: float | None = None,
        padding_mask_crop: int | None = None,
        outpaint: Sequence[int] | None = None,
    ):
        """Generate `num_images` images per prompt.

        Unset sampling arguments take the model's defaults (`defaults()`). Guidance is active iff
        `guidance_scale > 1`; `skip_layer_guidance=False` turns the model's default skip-layer guidance off.
        `latents` (B, 16, H/8, W/8), diffusers' NCHW layout, replaces the seeded initial noise. With `image`,
        runs img2img: the image is encoded and noised to the `strength` level (default 0.6) and only the last
        `strength` fraction of the steps run, as in diffusers. `output_type`: "pil" (PIL images), "np" (float32
        array (B, H, W, 3) in [0, 1]), "mlx" (the same as an MLX array) or "latent" (the final latents, an MLX
        array (B, 16, H/8, W/8)). `vae="tiny"` decodes with the tiny autoencoder (fast, small, lower quality). `callbacks` watch (and may stop)
        the steps; `progress` adds a progress bar.
        `Pipeline.run` is the full form, returning a `GenerationResult`."""
        request = self.request(
            prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, height=height, width=width, seed=seed, latents=latents, image=image,
            strength=strength, num_images=num_images, max_sequence_length=max_sequence_length,
            skip_layer_guidance=skip_layer_guidance, output_type=output_type, sampler=sampler, shift=shift,
            sigmas=sigmas, vae=vae, control_image=control_image, control_type=control_type,
            control_start=control_start, control_end=control_end, mask=mask, mask_blur=mask_blur,
            padding_mask_crop=padding_mask_crop, outpaint=outpaint,
        )
        return self.run(request, callbacks=[*callbacks, *([ProgressBar()] if progress else [])]).images

    def run(self, request: GenerationRequest, callbacks: Sequence[Callback] = (),
            conditionings: Sequence[Conditioning] = ()) -> GenerationResult:
        """Run a resolved request; `conditionings` add to those the request implies (img2img)."""
        with self._lock:
            stages: list[StageReport] = []
            try:
                return self._run(request, list(callbacks), list(conditionings), stages)
            finally:
                self.stages = stages

    def _run(self, request: GenerationRequest, callbacks: list[Callback], conditionings: list[Conditioning],
             stages: list[StageReport]) -> GenerationResult:
        sampler = request.make_sampler()
        sigmas = sampler.sigmas(request.steps, request.shift, request.sigmas)
        if request.image is not None:
            conditionings.insert(0, image_conditioning(request, self))
        first = img2img_start(request.steps, request.strength) if request.image is not None else 0
        plan = self.plan_memory(request, steps=request.steps - first)
        final_size = (request.height // self.vae_factor, request.width // self.vae_factor)
        latent_shape = (*sampler.latent_size(0, final_size), self.vae_config.latent_channels)
        x = (initial_noise(request.seeds, latent_shape) if request.latents is None
             else request.latents.transpose(0, 2, 3, 1))

        with self._stage("text encoders", stages):
            prompts = Prompts(*self.text_encoders.encode(
                list(request.prompts), list(request.negative_prompts or ()) or None, do_cfg=request.cfg,
                num_images_per_prompt=request.num_images, max_sequence_length=request.max_sequence_length,
            ))
            mx.eval(prompts.embeds, prompts.pooled, prompts.negative_embeds, prompts.negative_pooled)
            check_finite(prompts.embeds, "the text encoders")
            self.free("text_encoders")

        if request.control_images:
            conditionings.append(controlnet_conditioning(request, self, prompts))
        start = 0
        encodes = request.image is not None or bool(request.control_images)
        with self._stage("image encoder", stages) if encodes else nullcontext():
            for conditioning in conditionings:
                x, start = conditioning.prepare(x, sigmas, start)
            if encodes:  # the stage ends with the encoded latents, and frees the VAE in low-memory mode
                mx.eval(x)
                self.free("vae")
        x = x.astype(self.dtype)

        with self._stage("transformer", stages):
            few_step = not request.cfg and request.steps - start <= PRECOMPUTE_MAX_STEPS
            x = denoise(
                self.transformer, x, sigmas, start, prompts, sampler=sampler, noise=seeded_noise(request.seeds),
                guidance=request.guidance, skip_layer_guidance=request.skip_layer_guidance,
                conditionings=conditionings, callbacks=callbacks, precompute_modulation=few_step,
                drop_modulation_weights=few_step and self.low_memory,
            )
            self.free("transformer", "controlnets")
        for conditioning in conditionings:
            conditioning.release()
        images = x.transpose(0, 3, 1, 2) if request.output_type == "latent" else self._decode(request, x, plan, stages)
        return GenerationResult(images, x, request, self.identity, list(stages))

    def _decode(self, request: GenerationRequest, x: mx.array, plan: MemoryPlan, stages: list[StageReport]):
        """Final latents -> images of the request's output type."""
        with self._stage("vae decoder", stages):
            if request.vae == "tiny":
                decoded = self.require_tiny_autoencoder().decode(x)
            else:
                decoded = self.vae.latents_to_image(x, tiled=True if plan.tile_decode else self.vae_tiling)
            pixels = mx.clip(decoded.astype(mx.float32) / 2 + 0.5, 0, 1)
            mx.eval(pixels)
            check_finite(pixels, "the VAE decoder")
            self.free("vae")
        if request.padding_mask_crop is not None:
            pixels = mx.array(paste_crops(request, np.array(pixels)))
        return {"mlx": lambda: pixels, "np": lambda: np.array(pixels),
                "pil": lambda: numpy_to_pil(np.array(pixels))}[request.output_type]()

    @contextmanager
    def _stage(self, name: str, stages: list[StageReport]) -> Iterator[None]:
        mx.reset_peak_memory()
        start = time.perf_counter()
        yield
        stages.append(StageReport(name, time.perf_counter() - start, mx.get_peak_memory()))
        log.info("%s: %.2f s, peak memory %.2f GB", name, stages[-1].seconds, stages[-1].peak_memory / 1e9)

    def estimate_memory(self, height: int, width: int, images: int = 1, cfg: bool = False,
                        max_sequence_length: int = 256, steps: int | None = None,
                        **settings) -> list[memory.StageEstimate]:
        """Predicted peak bytes of each stage of a run (`memory_plan.estimate_memory`)."""
        return estimate_memory(self, height, width, images, cfg, max_sequence_length, steps, **settings)

    def plan_memory(self, request: GenerationRequest, steps: int | None = None) -> MemoryPlan:
        """Before anything loads: how the run fits the memory budget, else MemoryError naming a setting that
        would fit (`memory_plan.plan_memory`)."""
        return plan_memory(request, self.estimate_memory, low_memory=self.low_memory, steps=steps,
                           multiple=4 * self.vae_factor * self.transformer_config.patch_size)
