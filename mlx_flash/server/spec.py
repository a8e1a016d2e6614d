"""What one image request asks for, whichever API it came through, and the checks of its fields."""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..image_io import MAX_INPUT_PIXELS
from .errors import ApiError

MAX_IMAGES = 10  # images per request
MAX_STEPS = 500
MAX_PROMPT_CHARS = 20_000
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


@dataclass(frozen=True)
class ImageSpec:
    """A request mapped to the pipeline's terms; unset fields take the model's defaults."""

    model: str
    prompt: str
    seed: int  # image i uses seed + i, as `mlx-flash generate` does
    n: int = 1
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None
    image: Image.Image | None = None  # img2img input
    strength: float | None = None
    mask: Image.Image | None = None  # inpainting: grey, white repaints
    mask_blur: float | None = None
    padding_mask_crop: int | None = None
    loras: tuple[tuple[str, float], ...] = ()  # (name, scale) of each served LoRA applied (ModelPool.lora_scales)
    output_format: str = "png"
    compression: int | None = None  # JPEG / WebP quality, 0-100

    def settings(self) -> dict[str, Any]:
        """The fields that describe the request, for job status and the web page's gallery."""
        return {"model": self.model, "prompt": self.prompt, "negative_prompt": self.negative_prompt, "n": self.n,
                "seed": self.seed, "width": self.width, "height": self.height, "steps": self.steps,
                "guidance": self.guidance, "sampler": self.sampler, "img2img": self.image is not None,
                "inpaint": self.mask is not None, "strength": self.strength, "output_format": self.output_format,
                "loras": [{"name": name, "scale": scale} for name, scale in self.loras]}


def random_seed(n: int) -> int:
    return int(np.random.default_rng().integers(0, 2**31 - n))


# Field readers: each raises ApiError(400) naming the field and what it takes. ------------------------------

def text(body: dict, key: str, *, required: bool = False, default: str | None = None) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise ApiError(400, f"'{key}' is required; send it as a non-empty string.", param=key)
        return default
    if not isinstance(value, str):
        raise ApiError(400, f"'{key}' must be a string, got {type(value).__name__}.", param=key)
    if required and not value.strip():
        raise ApiError(400, f"'{key}' is empty; send a non-empty string.", param=key)
    if len(value) > MAX_PROMPT_CHARS:
        raise ApiError(400, f"'{key}' is {len(value)} characters long; the limit is {MAX_PROMPT_CHARS}.", param=key)
    return value


def integer(body: dict, key: str, low: int, high: int, default: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):  # multipart form fields are strings
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{key}' must be an integer from {low} to {high}, got {value!r}.", param=key)
    if not low <= value <= high:
        raise ApiError(400, f"'{key}' must be from {low} to {high}, got {value}.", param=key)
    return value


def number(body: dict, key: str, low: float, high: float, *, low_open: bool = False) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ApiError(400, f"'{key}' must be a number, got {value!r}.", param=key)
    if value < low or value > high or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ApiError(400, f"'{key}' must be in {interval}, got {value}.", param=key)
    return float(value)


def choice(body: dict, key: str, options: tuple[str, ...], default: str) -> str:
    value = body.get(key)
    if value is None:
        return default
    if value not in options:
        raise ApiError(400, f"'{key}' must be one of {', '.join(options)}, got {value!r}.", param=key)
    return value


def seed(body: dict, key: str, n: int) -> int:
    """The seed of the first image; missing or -1 (AUTOMATIC1111's "random") draws one."""
    value = integer(body, key, -1, 2**32 - 1 - n)
    return random_seed(n) if value is None or value == -1 else value


def size(value: Any, key: str = "size") -> tuple[int | None, int | None]:
    """"WxH" -> (width, height); None or "auto" -> the model's default size."""
    if value is None or value == "auto":
        return None, None
    match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", value) if isinstance(value, str) else None
    if match is None:
        raise ApiError(400, f"'{key}' must be \"WIDTHxHEIGHT\" (e.g. \"1024x1024\") or \"auto\", got {value!r}.",
                       param=key)
    return int(match[1]), int(match[2])


def image_bytes(data: bytes, key: str) -> Image.Image:
    """An uploaded image, decoded (the pipeline makes it RGB, EXIF orientation applied, as for files)."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_INPUT_PIXELS:
            raise ApiError(400, f"'{key}' is {image.width}x{image.height} pixels; send at most {MAX_INPUT_PIXELS} "
                                "pixels (it is resized to the model's size anyway).", param=key)
        image.load()
        return image
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise ApiError(400, f"'{key}' is not an image PIL can read; send a PNG, JPEG or WebP image.",
                       param=key) from None


def json_text(value: str, key: str) -> Any:
    """A form field holding JSON (e.g. `loras` in a multipart edits request)."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise ApiError(400, f"'{key}' is not valid JSON; send it as JSON text, e.g. "
                            '[{"name": "style", "scale": 0.8}].', param=key) from None


def base64_image(value: Any, key: str) -> Image.Image:
    """An image sent as base64 text, bare or as a data URL."""
    if not isinstance(value, str):
        raise ApiError(400, f"'{key}' must be a base64-encoded image (or a data URL), got {type(value).__name__}.",
                       param=key)
    encoded = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        return image_bytes(base64.b64decode(encoded, validate=True), key)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"'{key}' is not valid base64; send the image bytes base64-encoded.", param=key) from None
