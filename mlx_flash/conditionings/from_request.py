"""The conditionings a request asks for (img2img, inpainting, ControlNets), built from its images and a model's
parts, and inpainting's paste of generated crops back onto the image."""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np
from PIL import Image

from ..control_images import control_image
from ..denoise import Prompts
from ..image_io import load_image, numpy_to_pil
from ..inpaint import blur_mask, crop_region, image_pixels, latent_mask, mask_pixels, overlay
from ..request import GenerationRequest
from .controlnet import ControlInput, ControlNets
from .img2img import Img2Img
from .inpaint import Inpaint

if TYPE_CHECKING:
    from ..components import Components


def _mask(request: GenerationRequest) -> Image.Image:
    return blur_mask(request.mask, request.mask_blur)


def _crop(request: GenerationRequest) -> tuple[int, int, int, int] | None:
    if request.padding_mask_crop is None:
        return None
    return crop_region(_mask(request), request.width, request.height, request.padding_mask_crop)


def image_conditioning(request: GenerationRequest, parts: Components) -> Img2Img:
    """img2img from `request.image`, or inpainting (an `Inpaint`) when the request has a mask."""
    w, h = request.width, request.height
    if request.mask is None:
        return Img2Img(mx.array(load_image(request.image, w, h)), request.strength, parts.encode_image)
    crop, mask = _crop(request), _mask(request)
    pixels = mx.array(image_pixels(request.image, w, h, crop))
    return Inpaint(pixels, request.strength, parts.encode_image,
                   latent_mask(mask_pixels(mask, w, h, crop), parts.vae_factor))


def controlnet_conditioning(request: GenerationRequest, parts: Components, prompts: Prompts) -> ControlNets:
    """The request's control images through the parts' ControlNets (an inpainting ControlNet takes the image to
    inpaint and the mask)."""
    w, h = request.width, request.height
    inputs = []
    for i, ((_, _, scale), config) in enumerate(zip(parts.controlnet_specs, parts.controlnet_configs)):
        picture = request.control_images[i]
        if config.extra_conditioning_channels:
            pixels, mask = image_pixels(picture, w, h), mask_pixels(_mask(request), w, h)
        else:
            pixels, mask = load_image(control_image(picture, request.control_type), w, h), None
        inputs.append(ControlInput(lambda i=i: parts.controlnets[i], config, mx.array(pixels), mask, scale,
                                   request.control_start[i], request.control_end[i]))
    vae = parts.vae_config
    return ControlNets(inputs, prompts, lambda p: parts.vae.encode(p.astype(parts.dtype))[0], vae.scaling_factor,
                       vae.shift_factor, lambda: parts.transformer.pos_embed)


def paste_crops(request: GenerationRequest, pixels: np.ndarray) -> np.ndarray:
    """padding_mask_crop: each generated crop scaled back onto its box of the image, where the mask is."""
    crop, mask = _crop(request), _mask(request)
    pasted = [overlay(request.image, image, mask, crop) for image in numpy_to_pil(pixels)]
    return np.stack([np.asarray(p, np.float32) / 255 for p in pasted])
