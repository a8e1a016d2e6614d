"""The one place the server calls the pipeline: check a request against a model, run it, report its steps."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

from PIL import Image

from .. import __version__
from ..pipeline import Pipeline
from .errors import ApiError
from .spec import ImageSpec

SAMPLERS = ("euler",)  # the samplers the pipeline runs
StepHandler = Callable[[int, int, Image.Image | None], None]  # (steps done, steps in all, preview or None)


class Cancelled(Exception):
    """The job was cancelled before its images were made."""


@dataclass(frozen=True)
class Generated:
    """A finished run: one image, seed and metadata (everything that determines its pixels) per image."""

    images: list[Image.Image]
    seeds: list[int]
    metadata: list[dict[str, Any]]


def prepare(pipe: Pipeline, spec: ImageSpec) -> dict[str, Any]:
    """The pipeline arguments of `spec`, checked against the model before the job is queued (ApiError 400)."""
    if spec.sampler not in (None, *SAMPLERS):
        raise ApiError(400, f"unknown sampler {spec.sampler!r}; use one of {', '.join(SAMPLERS)}.", param="sampler")
    default = pipe.transformer_config.sample_size * pipe.vae_factor
    width, height = spec.width, spec.height
    if spec.image is not None and width is None and height is None:
        width, height = (max(16, s // 16 * 16) for s in spec.image.size)
    try:
        pipe.check_size(height or default, width or default)
    except ValueError as err:
        w, h = nearest_size(pipe, width or default, height or default)
        raise ApiError(400, f"{str(err).rstrip('.')}; the nearest size that works is {w}x{h}.", param="size") from None
    return dict(prompt=spec.prompt, negative_prompt=spec.negative_prompt, num_inference_steps=spec.steps,
                guidance_scale=spec.guidance, height=height, width=width, seed=spec.seed, image=spec.image,
                strength=spec.strength, num_images=spec.n)


def nearest_size(pipe: Pipeline, width: int, height: int) -> tuple[int, int]:
    """The size closest to width x height that the model can make (multiples of 16 within its position table)."""
    multiple = pipe.vae_factor * pipe.transformer_config.patch_size
    largest = pipe.transformer_config.pos_embed_max_size * multiple
    return tuple(min(largest, max(multiple, round(side / multiple) * multiple)) for side in (width, height))


def run(pipe: Pipeline, spec: ImageSpec, arguments: dict[str, Any], *, on_step: StepHandler,
        cancel: threading.Event) -> Generated:
    """Generate `spec`'s images; `on_step` hears of each finished step, `cancel` stops the run (Cancelled)."""
    if cancel.is_set():
        raise Cancelled()
    steps, guidance, _ = pipe.defaults()
    steps = spec.steps or steps
    images = pipe.generate(**arguments, progress=False)
    if cancel.is_set():
        raise Cancelled()
    on_step(steps, steps, None)
    seeds = [spec.seed + i for i in range(spec.n)]
    base = {"prompt": spec.prompt, "negative_prompt": spec.negative_prompt, "steps": steps,
            "guidance": spec.guidance if spec.guidance is not None else guidance, "model": spec.model,
            "sampler": spec.sampler or SAMPLERS[0], "dtype": str(pipe.dtype), "quantize": pipe.quantize,
            "t5": pipe.text_encoders.use_t5, "mlx_flash_version": __version__}
    if spec.image is not None:
        base.update(image="upload", strength=0.6 if spec.strength is None else spec.strength)
    metadata = [{**base, "seed": s, "width": image.width, "height": image.height} for s, image in zip(seeds, images)]
    return Generated(images, seeds, metadata)
