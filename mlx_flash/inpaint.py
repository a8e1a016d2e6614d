"""Inpainting and outpainting inputs, with the semantics of diffusers' StableDiffusion3InpaintPipeline: the mask
(white = repaint) blurred, resized and binarised, the crop around it (`padding_mask_crop`), the latent-space
mask, the blend after each step that keeps the unmasked latents on the image's noising path, the composite of
the result over the original, and outpainting's padded image and border mask."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from .image_io import open_rgb
from .sampler import add_noise

Box = tuple[int, int, int, int]  # left, top, right, bottom (pixels; right and bottom exclusive)
LANCZOS = Image.Resampling.LANCZOS


def open_mask(mask: str | Path | Image.Image) -> Image.Image:
    """A mask file or image as 8-bit grey (white repaints, black keeps); refuses an empty (all-black) mask."""
    if isinstance(mask, Image.Image):
        grey = mask.convert("L")
    else:
        path = Path(mask)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such mask file; check the path.")
        try:
            with Image.open(path) as opened:
                grey = opened.convert("L")
        except (UnidentifiedImageError, OSError):
            raise ValueError(f"{path}: not an image file PIL can read; pass the mask as a PNG (white = repaint).") \
                from None
    if grey.getextrema()[1] == 0:
        raise ValueError("the mask is empty (all black): nothing would be repainted; paint the area to change white.")
    return grey


def crop_region(mask: Image.Image, width: int, height: int, pad: int) -> Box:
    """The box around the mask's non-black pixels, grown by `pad` and then to the aspect ratio `width / height`,
    kept inside the mask (diffusers' VaeImageProcessor.get_crop_region)."""
    pixels = np.asarray(mask.convert("L"))
    rows, cols = np.flatnonzero(pixels.any(axis=1)), np.flatnonzero(pixels.any(axis=0))
    h, w = pixels.shape
    x1, y1 = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
    x2, y2 = min(int(cols[-1]) + 1 + pad, w), min(int(rows[-1]) + 1 + pad, h)
    target = width / height
    if (x2 - x1) / (y2 - y1) > target:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / target - (y2 - y1)), h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * target - (x2 - x1)), w)
    return x1, y1, x2, y2


def _grow(start: int, end: int, by: int, limit: int) -> tuple[int, int]:
    """[start, end) widened by `by` (half each side), shifted back inside [0, limit)."""
    start, end = start - by // 2, end + by - by // 2
    if end >= limit:
        start, end = start - (end - limit), limit
    if start < 0:
        start, end = 0, end - start
    return start, min(end, limit)


def resize_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` scaled to fit inside width x height keeping its aspect ratio, centred, the bands left over filled
    by stretching its first and last rows (or columns) (diffusers' resize_mode="fill")."""
    ratio, source = width / height, image.width / image.height
    w = width if ratio < source else image.width * height // image.height
    h = height if ratio >= source else image.height * width // image.width
    resized = image.resize((w, h), resample=LANCZOS)
    out = Image.new(image.mode if image.mode == "L" else "RGB", (width, height))
    out.paste(resized, box=(width // 2 - w // 2, height // 2 - h // 2))
    if ratio < source and (band := height // 2 - h // 2) > 0:
        out.paste(resized.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
        out.paste(resized.resize((width, band), box=(0, h, width, h)), box=(0, band + h))
    elif ratio > source and (band := width // 2 - w // 2) > 0:
        out.paste(resized.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
        out.paste(resized.resize((band, height), box=(w, 0, w, height)), box=(band + w, 0))
    return out


def resize_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` scaled to cover width x height keeping its aspect ratio, centred, the excess cut off."""
    ratio, source = width / height, image.width / image.height
    w = width if ratio > source else image.width * height // image.height
    h = height if ratio <= source else image.height * width // image.width
    out = Image.new("RGB", (width, height))
    out.paste(image.resize((w, h), resample=LANCZOS), box=(width // 2 - w // 2, height // 2 - h // 2))
    return out


def _fit(image: Image.Image, width: int, height: int, crop: Box | None) -> Image.Image:
    if crop is not None:
        return resize_fill(image.crop(crop), width, height)
    return image if image.size == (width, height) else image.resize((width, height), resample=LANCZOS)


def image_pixels(image: Image.Image, width: int, height: int, crop: Box | None = None) -> np.ndarray:
    """The image to inpaint as (1, height, width, 3) float32 in [-1, 1]: cropped to `crop` and fitted, or resized."""
    pixels = np.asarray(_fit(open_rgb(image), width, height, crop)).astype(np.float32) / 255.0
    return (2.0 * pixels - 1.0)[None]


def mask_pixels(mask: Image.Image, width: int, height: int, crop: Box | None = None) -> np.ndarray:
    """The mask as (1, height, width, 1) float32 in {0, 1} (1 = repaint): cropped and fitted, or resized (Lanczos),
    then binarised at one half."""
    grey = np.asarray(_fit(mask, width, height, crop).convert("L")).astype(np.float32) / 255.0
    return (grey >= 0.5).astype(np.float32)[None, ..., None]


def blur_mask(mask: Image.Image, radius: float) -> Image.Image:
    """The mask softened by a Gaussian of `radius` pixels (PIL's, as VaeImageProcessor.blur)."""
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius else mask


def latent_mask(mask: np.ndarray, factor: int) -> mx.array:
    """A pixel mask (B, H, W, 1) at latent resolution, nearest neighbour (torch's interpolate default)."""
    return mx.array(mask[:, ::factor, ::factor])


def blend(latents: mx.array, image_latents: mx.array, noise: mx.array, mask: mx.array, sigma_next: float) -> mx.array:
    """Latents after a step: the model's where the mask repaints, the image noised to `sigma_next` elsewhere."""
    return (1 - mask) * add_noise(image_latents, noise, sigma_next) + mask * latents


def overlay(original: Image.Image, generated: Image.Image, mask: Image.Image, crop: Box | None = None) -> Image.Image:
    """The result pasted over the original where the mask is white (StableDiffusion3InpaintPipeline's
    `padding_mask_crop` output): a generated crop is scaled back onto its box first."""
    original = open_rgb(original)
    if crop is not None:
        canvas = Image.new("RGBA", original.size)
        canvas.paste(resize_crop(generated, crop[2] - crop[0], crop[3] - crop[1]), crop[:2])
        generated = canvas.convert("RGB")
    kept = Image.new("RGBa", original.size)  # the original, premultiplied by the keep alpha (inverted mask)
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    result = generated.convert("RGBA")
    result.alpha_composite(kept.convert("RGBA"))
    return result.convert("RGB")


class Outpaint(NamedTuple):
    image: Image.Image  # the image on the larger canvas, the new border filled with its nearest edge pixels
    mask: Image.Image  # white on the new border


def outpaint(image: Image.Image, left: int, top: int, right: int, bottom: int,
             mask: Image.Image | None = None) -> Outpaint:
    """The padded image and the mask of its new border (plus `mask`'s own white area, padded with it)."""
    if min(left, top, right, bottom) < 0 or not any((left, top, right, bottom)):
        raise ValueError(f"outpaint takes LEFT,TOP,RIGHT,BOTTOM pixel counts >= 0, not all zero; got "
                         f"{left},{top},{right},{bottom}.")
    pixels = np.asarray(open_rgb(image))
    padded = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge")
    border = np.full(padded.shape[:2], 255, np.uint8)
    inner = np.zeros(pixels.shape[:2], np.uint8) if mask is None else np.asarray(
        mask.convert("L").resize((pixels.shape[1], pixels.shape[0]), resample=LANCZOS))
    border[top : top + pixels.shape[0], left : left + pixels.shape[1]] = inner
    return Outpaint(Image.fromarray(padded), Image.fromarray(border))
