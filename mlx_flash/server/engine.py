"""The one place the server calls the pipeline: check a request against a model, run it with progress,
previews and cancel."""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import Callable, Hashable

import mlx.core as mx
import numpy as np
from PIL import Image

from ..callbacks import Cancel, Preview
from ..denoise import Callback, GenerationStopped, StepState
from ..image_io import numpy_to_pil
from ..memory_plan import smaller_sizes
from ..pipeline import Pipeline
from ..request import GenerationRequest, GenerationResult, check_size
from ..samplers import SAMPLERS
from .errors import ApiError
from .spec import ImageSpec

StepHandler = Callable[[int, int], None]  # (steps done, steps of the full schedule)
PreviewHandler = Callable[[Image.Image], None]

log = logging.getLogger("mlx_flash.server")


class Cancelled(Exception):
    """The job was cancelled before its images were made."""


def prepare(pipe: Pipeline, spec: ImageSpec, fits: set[tuple] | None = None, key: Hashable = None
            ) -> GenerationRequest:
    """`spec` resolved against the model and checked (size, memory, every field) before it is queued: ApiError
    400 with the pipeline's one-line reason. `fits` remembers the shapes (of pipeline `key`) whose memory check
    passed (the check reads every component's config and weight headers: tens of milliseconds)."""
    if spec.sampler is not None and spec.sampler not in SAMPLERS:
        raise ApiError(400, f"unknown sampler {spec.sampler!r}; use one of {', '.join(SAMPLERS)}.", param="sampler")
    defaults = pipe.sampling_defaults()
    if spec.width is not None or spec.height is not None:
        width, height = spec.width or defaults.size, spec.height or defaults.size
        try:
            check_size(height, width, defaults)
        except ValueError as err:
            w, h = nearest_size(width, height, defaults.multiple, defaults.largest)
            raise ApiError(400, f"{str(err).rstrip('.')}; the nearest size that works is {w}x{h}.",
                           param="size") from None
    try:
        request = pipe.request(
            spec.prompt, negative_prompt=spec.negative_prompt, num_inference_steps=spec.steps,
            guidance_scale=spec.guidance, height=spec.height, width=spec.width, seed=spec.seed, image=spec.image,
            strength=spec.strength, num_images=spec.n, sampler=spec.sampler, mask=spec.mask, mask_blur=spec.mask_blur,
            padding_mask_crop=spec.padding_mask_crop)
        shape = (key, request.height, request.width, request.batch, request.cfg, request.max_sequence_length)
        if fits is None or shape not in fits:
            pipe.plan_memory(request)
            if fits is not None:
                fits.add(shape)
    except MemoryError as err:
        raise ApiError(400, memory_advice(pipe, request, str(err)), param="size") from None
    except ValueError as err:
        raise ApiError(400, str(err)) from None
    return request


def memory_advice(pipe: Pipeline, request: GenerationRequest, reason: str) -> str:
    """The memory guard's reason, with the largest size of the same shape that fits (the request's terms rather
    than the command line's)."""
    multiple, (height, width) = pipe.sampling_defaults().multiple, (request.height, request.width)
    for h, w in smaller_sizes(height, width, multiple):
        try:
            pipe.plan_memory(replace(request, height=h, width=w))
        except MemoryError:
            continue
        return f"{reason.split('; ')[0]}; the nearest size that works is {w}x{h}."
    fewer = "; send fewer images" if request.batch > 1 else ""
    return f"{reason.split('; ')[0]}; no size fits this server's memory{fewer}."


def nearest_size(width: int, height: int, multiple: int, largest: int) -> tuple[int, int]:
    """The size closest to width x height whose sides are multiples of `multiple`, at most `largest`."""
    return tuple(min(largest // multiple * multiple, max(multiple, round(side / multiple) * multiple))
                 for side in (width, height))


class Progress(Callback):
    def __init__(self, on_step: StepHandler):
        self.on_step_done = on_step

    def on_step(self, state: StepState) -> None:
        self.on_step_done(state.index + 1, state.num_steps)


def run(pipe: Pipeline, request: GenerationRequest, *, on_step: StepHandler, cancel: threading.Event,
        on_preview: PreviewHandler | None = None, preview_every: int = 1) -> GenerationResult:
    """Run `request`: `on_step` hears of each step, `on_preview` gets the first image's clean estimate every
    `preview_every` steps; `cancel` stops the run after the step in progress (Cancelled)."""
    if cancel.is_set():
        raise Cancelled()
    callbacks: list[Callback] = [Cancel(cancel), Progress(on_step)]
    decode = preview_decoder(pipe) if on_preview is not None else None
    if decode is not None:
        callbacks.append(Preview(lambda step, images: on_preview(numpy_to_pil(np.array(images))[0]),
                                 lambda latents: decode(latents[:1]), every=preview_every))
    try:
        return pipe.run(request, callbacks=callbacks)
    except GenerationStopped:
        raise Cancelled() from None


def preview_decoder(pipe: Pipeline) -> Callable[[mx.array], mx.array] | None:
    """The model's preview decoder (tiny autoencoder or linear latent map), or None when it has neither."""
    try:
        return pipe.preview_decoder()
    except ValueError as err:
        log.warning("no previews for %s: %s", pipe.name, err)
        return None
