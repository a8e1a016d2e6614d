"""AUTOMATIC1111's web UI API (/sdapi/v1/...), as Open WebUI's and other clients' A1111 engines call it."""

from __future__ import annotations

import base64
import json
from typing import Any

from PIL import Image, ImageOps

from . import spec as fields
from .errors import ApiError
from .jobs import Job
from .models import ModelPool
from .spec import MAX_IMAGES, MAX_STEPS, ImageSpec

SAMPLER_NAMES = {"Euler": "euler"}  # A1111's display names -> ours; other names pass through as given


class Checkpoint:
    """The model `/sdapi/v1/options` selects (A1111 holds one for the whole server)."""

    def __init__(self, pool: ModelPool):
        self.pool, self.name = pool, pool.default

    def options(self) -> dict[str, Any]:
        return {"sd_model_checkpoint": self.name, "sd_checkpoint_hash": None}

    def set_options(self, body: Any) -> None:
        if not isinstance(body, dict):
            raise ApiError(400, f"the options must be a JSON object, got {type(body).__name__}.")
        if body.get("sd_model_checkpoint") is not None:
            self.name = self.pool.resolve(body["sd_model_checkpoint"])


def sd_models(pool: ModelPool) -> list[dict[str, Any]]:
    return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}
            for name in pool.names]


def image_spec(body: Any, checkpoint: Checkpoint, img2img: bool = False) -> ImageSpec:
    """A txt2img / img2img body -> ImageSpec; unset fields take the model's defaults (not A1111's). An img2img
    `mask` inpaints (white repaints; `inpainting_mask_invert`, `mask_blur`, `inpaint_full_res` with its padding)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}.")
    override = body.get("override_settings") or {}
    if not isinstance(override, dict):
        raise ApiError(400, "'override_settings' must be a JSON object.", param="override_settings")
    model = checkpoint.pool.resolve(override.get("sd_model_checkpoint") or checkpoint.name)
    batch = fields.integer(body, "batch_size", 1, MAX_IMAGES, 1)
    iterations = fields.integer(body, "n_iter", 1, MAX_IMAGES, 1)
    if batch * iterations > MAX_IMAGES:
        raise ApiError(400, f"batch_size x n_iter is {batch * iterations} images; the limit is {MAX_IMAGES}.",
                       param="batch_size")
    n = batch * iterations
    image = strength = mask = mask_blur = crop = None
    if img2img:
        init = body.get("init_images")
        if not isinstance(init, list) or len(init) != 1:
            raise ApiError(400, "'init_images' must be a list of one base64 image.", param="init_images")
        image = fields.base64_image(init[0], "init_images")
        strength = fields.number(body, "denoising_strength", 0, 1, low_open=True)
        if body.get("mask"):
            invert = bool(body.get("inpainting_mask_invert"))
            mask = inpainting_mask(fields.base64_image(body["mask"], "mask"), invert)
            mask_blur = fields.number(body, "mask_blur", 0, 1000)
            if body.get("inpaint_full_res"):  # "only masked": a crop around the mask, grown by the padding
                crop = fields.integer(body, "inpaint_full_res_padding", 0, 10**5, 32)
    sampler = fields.text(body, "sampler_name") or fields.text(body, "sampler_index")
    return ImageSpec(
        model=model, prompt=fields.text(body, "prompt", default=""), n=n, seed=fields.seed(body, "seed", n),
        negative_prompt=fields.text(body, "negative_prompt") or None,
        width=fields.integer(body, "width", 16, 16384), height=fields.integer(body, "height", 16, 16384),
        steps=fields.integer(body, "steps", 1, MAX_STEPS), guidance=fields.number(body, "cfg_scale", 0, 100),
        sampler=SAMPLER_NAMES.get(sampler, sampler), image=image, strength=strength, mask=mask,
        mask_blur=mask_blur, padding_mask_crop=crop, loras=checkpoint.pool.lora_scales(body.get("loras")),
    )


def inpainting_mask(mask: Image.Image, invert: bool) -> Image.Image:
    """A1111's mask -> the pipeline's (white repaints): grey as sent, or its alpha where it has transparent
    pixels; `invert` (inpainting_mask_invert) repaints the black part instead."""
    has_alpha = "A" in mask.getbands() or "transparency" in mask.info
    alpha = mask.convert("RGBA").getchannel("A") if has_alpha else None
    grey = alpha if alpha is not None and alpha.getextrema()[0] < 255 else mask.convert("L")
    return ImageOps.invert(grey) if invert else grey


def images_response(job: Job, body: dict[str, Any]) -> dict[str, Any]:
    """A1111's answer: base64 PNGs, the request as `parameters`, the settings as a JSON string `info`."""
    first = job.metadata[0]
    info = {**first, "all_seeds": job.seeds, "cfg_scale": first["guidance"], "sampler_name": first["sampler"],
            "sd_model_name": first["model"], "batch_size": len(job.seeds)}
    return {"images": [base64.b64encode(image).decode() for image in job.images], "parameters": body,
            "info": json.dumps(info)}
