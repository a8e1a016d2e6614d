"""OpenAI's Images API (POST /v1/images/generations and /v1/images/edits) mapped to ImageSpec, and its answers.

Besides OpenAI's fields a request may carry `steps`, `seed`, `guidance`, `negative_prompt`, `sampler`, `loras`
(names the server was started with, see ModelPool.lora_scales) and, for edits, `strength`; `quality` sets the
steps when `steps` is absent (QUALITY_STEPS). An edit's `mask` is OpenAI's: its transparent pixels are repainted."""

from __future__ import annotations

import base64
from typing import Any

from PIL import Image

from . import spec as fields
from .errors import ApiError
from .jobs import Job, image_url
from .models import ModelPool
from .spec import MAX_IMAGES, MAX_STEPS, OUTPUT_FORMATS, ImageSpec

QUALITY_STEPS = {"low": 0.5, "medium": 1.0, "standard": 1.0, "auto": 1.0, "high": 2.0, "hd": 2.0}  # x model's steps
RESPONSE_FORMATS = ("b64_json", "url")


def image_spec(body: dict[str, Any], pool: ModelPool, image=None, mask=None) -> tuple[ImageSpec, str]:
    """A generations (or, with `image` and maybe a white-repaints `mask`, edits) body -> (ImageSpec,
    response_format)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}.")
    model = pool.resolve(body.get("model"))
    prompt = fields.text(body, "prompt", required=True)
    n = fields.integer(body, "n", 1, MAX_IMAGES, 1)
    width, height = fields.size(body.get("size"))
    steps = fields.integer(body, "steps", 1, MAX_STEPS)
    quality = fields.choice(body, "quality", tuple(QUALITY_STEPS), "auto")
    if steps is None and QUALITY_STEPS[quality] != 1.0:
        steps = max(1, round(pool.pipeline(model).defaults()[0] * QUALITY_STEPS[quality]))
    spec = ImageSpec(
        model=model, prompt=prompt, n=n, seed=fields.seed(body, "seed", n), width=width, height=height, steps=steps,
        negative_prompt=fields.text(body, "negative_prompt"), guidance=fields.number(body, "guidance", 0, 100),
        sampler=fields.text(body, "sampler"), image=image, mask=mask, loras=pool.lora_scales(body.get("loras")),
        strength=fields.number(body, "strength", 0, 1, low_open=True) if image is not None else None,
        output_format=fields.choice(body, "output_format", tuple(OUTPUT_FORMATS), "png"),
        compression=fields.integer(body, "output_compression", 0, 100),
    )
    return spec, fields.choice(body, "response_format", RESPONSE_FORMATS, "b64_json")


def edit_spec(form: dict[str, Any], pool: ModelPool) -> tuple[ImageSpec, str]:
    """A multipart edits form (fields as str, files as bytes) -> img2img ImageSpec."""
    images = [form[key] for key in ("image", "image[]") if key in form]
    images = [i for group in images for i in (group if isinstance(group, list) else [group])]
    if len(images) != 1 or not isinstance(images[0], bytes):
        raise ApiError(400, f"'image' must be one uploaded image file, got {len(images)}; send one.", param="image")
    mask = form.get("mask")
    if mask is not None and not isinstance(mask, bytes):
        raise ApiError(400, "'mask' must be an uploaded PNG file whose transparent pixels mark what to edit.",
                       param="mask")
    text = {k: v for k, v in form.items() if isinstance(v, str)}
    if isinstance(text.get("loras"), str):  # a form field: JSON text
        text["loras"] = fields.json_text(text["loras"], "loras")
    return image_spec(text, pool, fields.image_bytes(images[0], "image"),
                      transparent_mask(fields.image_bytes(mask, "mask")) if mask is not None else None)


def transparent_mask(mask: Image.Image) -> Image.Image:
    """OpenAI's mask (fully transparent pixels are edited) -> the pipeline's (white repaints, black keeps)."""
    if "A" not in mask.getbands() and "transparency" not in mask.info:
        raise ApiError(400, "'mask' has no alpha channel; send a PNG whose transparent (alpha 0) pixels mark what "
                            "to edit, as OpenAI's API takes.", param="mask")
    alpha = mask.convert("RGBA").getchannel("A")
    return alpha.point(lambda a: 255 if a == 0 else 0)


def images_response(job: Job, response_format: str, base_url: str) -> dict[str, Any]:
    """OpenAI's ImagesResponse; each item also carries the `seed` that reproduces it."""
    data = []
    for i, (image, seed) in enumerate(zip(job.images, job.seeds, strict=True)):
        item = {"b64_json": base64.b64encode(image).decode()} if response_format == "b64_json" else \
            {"url": image_url(base_url, job, i)}
        data.append({**item, "revised_prompt": None, "seed": seed})
    first = job.metadata[0]
    return {"created": int(job.created), "data": data, "output_format": job.spec.output_format,
            "size": f"{first['width']}x{first['height']}"}


def models_response(pool: ModelPool) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "mlx-flash"}
                                       for name in pool.names]}
