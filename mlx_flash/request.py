"""What a generation is asked to do, resolved against the model's defaults and checked in one place, and what
it produced."""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
import numpy as np
from PIL import Image

from .control_images import CONTROL_TYPES
from .image_io import open_rgb
from .inpaint import open_mask
from .inpaint import outpaint as outpaint_canvas
from .presets import SkipLayerGuidance
from .sampler import NUM_TRAIN_TIMESTEPS
from .samplers import SAMPLERS, Sampler, make_sampler
from .version import __version__

log = logging.getLogger("mlx_flash")

SEED_LIMIT = 2**64  # MLX's random keys take unsigned 64-bit seeds
OUTPUT_TYPES = ("pil", "np", "mlx", "latent")
DECODERS = ("full", "tiny")  # the VAE, or the tiny autoencoder (fast, small, lower quality)
DEFAULT_STRENGTH = 0.6
OUTPAINT_STRENGTH = 1.0  # the new border has no content to keep: start from noise there


@dataclass(frozen=True)
class ModelDefaults:
    """What a model runs with unless told otherwise, and the sizes it can make."""

    steps: int
    guidance: float
    skip_layer_guidance: SkipLayerGuidance | None
    max_sequence_length: int
    shift: float
    size: int  # default image side, pixels
    multiple: int  # image sides must be multiples of this
    largest: int  # the longest side its position table allows
    num_layers: int
    latent_factor: int = 8  # image pixels per latent pixel
    latent_channels: int = 16
    sampler: str = "euler"
    sigmas: tuple[float, ...] | None = None
    scales: tuple[int, ...] | None = None  # the scale-wise sampler's latent sides per step
    controlnets: int = 0  # ControlNets loaded with the model
    inpainting_controlnet: bool = False  # one of them takes the image to inpaint and its mask


@dataclass(frozen=True, eq=False)
class GenerationRequest:
    """Every setting of one generation, resolved: nothing here is left to a default."""

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...] | None  # one per prompt; None: no negative prompt ("" under CFG)
    num_images: int  # per prompt
    steps: int
    guidance: float  # classifier-free guidance runs iff > 1
    skip_layer_guidance: SkipLayerGuidance | None  # only under CFG
    height: int
    width: int
    seeds: tuple[int, ...]  # one per image, in batch order (prompt-major)
    max_sequence_length: int
    sampler: str
    shift: float
    sigmas: tuple[float, ...] | None  # custom noise levels (one per step), else the sampler's spacing
    image: Image.Image | None = None  # img2img source, RGB
    image_hash: str | None = None  # sha256 of the source file (or of its pixels)
    strength: float | None = None
    latents: mx.array | None = None  # (B, 16, H/8, W/8) replacing the seeded noise
    output_type: str = "pil"
    vae: str = "full"  # which decoder makes the final image (DECODERS)
    scales: tuple[int, ...] | None = None  # latent sides per step (the scale-wise sampler only)
    control_images: tuple[Image.Image, ...] = ()  # one per ControlNet, RGB, as given
    control_hashes: tuple[str, ...] = ()
    control_type: str = "none"  # what is computed from them: "canny" edges, "blur", or "none" (used as they are)
    control_start: tuple[float, ...] = ()  # per ControlNet, fractions of the steps run
    control_end: tuple[float, ...] = ()
    mask: Image.Image | None = None  # grey, the image's size; white repaints
    mask_hash: str | None = None  # of the mask given (None for outpainting's own)
    mask_blur: float = 0.0  # Gaussian radius in pixels, applied to the mask first
    padding_mask_crop: int | None = None  # inpaint only a crop around the mask, grown by this many pixels
    outpaint: tuple[int, int, int, int] | None = None  # pixels added left, top, right, bottom

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.num_images

    @property
    def cfg(self) -> bool:
        return self.guidance > 1

    def make_sampler(self) -> Sampler:
        """A fresh sampler for a run of this request (one per run: multistep samplers keep state)."""
        return _sampler(self.sampler, self.scales)

    def settings(self, index: int) -> dict[str, Any]:
        """What determines image `index`'s pixels (besides the model), as JSON-ready values."""
        slg = self.skip_layer_guidance
        settings = {
            "prompt": self.prompts[index // self.num_images],
            "negative_prompt": (self.negative_prompts[index // self.num_images] if self.negative_prompts else None),
            "seed": self.seeds[index], "steps": self.steps, "guidance": self.guidance,
            "skip_layer_guidance": asdict(slg) if slg is not None and self.cfg else None,
            "width": self.width, "height": self.height, "sampler": self.sampler, "shift": self.shift,
            "sigmas": list(self.sigmas) if self.sigmas is not None else None,
            "max_sequence_length": self.max_sequence_length, "vae": self.vae,
        }
        if self.image is not None:
            settings.update(image_sha256=self.image_hash, strength=self.strength)
        if self.scales is not None:
            settings["scales"] = list(self.scales)
        if self.control_images:
            settings.update(control_sha256=list(self.control_hashes), control_type=self.control_type,
                            control_start=list(self.control_start), control_end=list(self.control_end))
        if self.mask is not None:
            settings.update(mask_sha256=self.mask_hash, mask_blur=self.mask_blur,
                            padding_mask_crop=self.padding_mask_crop)
        if self.outpaint is not None:
            settings["outpaint"] = list(self.outpaint)
        if self.latents is not None:
            settings["latents"] = "given"  # the pixels depend on arrays the metadata cannot hold
        return settings


@dataclass(frozen=True)
class StageReport:
    """Wall time and peak memory (bytes, `mx.get_peak_memory`) of one pipeline stage."""

    name: str
    seconds: float
    peak_memory: int


@dataclass(eq=False)
class GenerationResult:
    """What a generation produced: images as asked (`request.output_type`), the final latents (B, H/8, W/8, 16),
    the request itself, and each stage's time and peak memory."""

    images: Any
    latents: mx.array
    request: GenerationRequest
    model: dict[str, Any]  # the model's identity and load settings (name, fingerprint, dtype, ...)
    stages: list[StageReport] = field(default_factory=list)

    @property
    def seeds(self) -> tuple[int, ...]:
        return self.request.seeds

    def metadata(self, index: int) -> dict[str, Any]:
        """Everything that determines image `index`'s pixels, for its PNG (`mlx-flash generate --from`)."""
        return {**self.request.settings(index), **self.model, "mlx_flash_version": __version__}


def _finite_number(value: Any, name: str, low: float, high: float, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ValueError(f"{name} must be {allowed}, got {value!r}.")
    return float(value)


def _count(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high}, got {value!r}.")
    return int(value)


def _texts(value: str | Sequence[str] | None, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    texts = (value,) if isinstance(value, str) else tuple(value)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {value!r}.")
    return texts


def image_seeds(seed: int | Sequence[int] | None, batch: int) -> tuple[int, ...]:
    """One seed per image: a list as given, an int `s` as s, s+1, ...; None draws a random start. Seeds
    are integers in [0, 2**64)."""
    if seed is None:
        seed = int(np.random.default_rng().integers(0, 2**31))
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        seeds = tuple(int(seed) + i for i in range(batch))
    else:
        seeds = tuple(seed)
        if len(seeds) != batch:
            raise ValueError(f"got {len(seeds)} seeds for {batch} images; pass one seed, or one per image.")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < SEED_LIMIT:
            last = "" if len(seeds) == 1 else f" (image i uses seed + i: the first seed must be < 2**64 - {batch - 1})"
            raise ValueError(f"seed must be an integer from 0 to 2**64 - 1, got {s!r}{last}.")
    return tuple(int(s) for s in seeds)


def _sampler(name: Any, scales: tuple[int, ...] | None) -> Sampler:
    if not isinstance(name, str):
        raise ValueError(f"sampler must be a name, one of {', '.join(SAMPLERS)}; got {name!r}.")
    return make_sampler(name, **({"scales": scales} if scales is not None else {}))


def _image_hash(image: str | Path | Image.Image) -> str:
    if isinstance(image, Image.Image):
        return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()
    return hashlib.sha256(Path(image).read_bytes()).hexdigest()


def _side(value: Any, name: str, default: int, model: ModelDefaults) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive multiple of {model.multiple} pixels, got {value!r}.")
    return int(value)


def check_size(height: int, width: int, model: ModelDefaults) -> None:
    """Raise ValueError unless the model can make an image of this size."""
    m = model.multiple
    if height % m or width % m:
        suggestion = f"{-(-width // m) * m}x{-(-height // m) * m}"  # rounded up
        raise ValueError(f"image size {width}x{height} is not a multiple of {m}; use e.g. {suggestion}.")
    if height > model.largest or width > model.largest:
        raise ValueError(f"image size {width}x{height} exceeds this model's position table; "
                         f"the largest side is {model.largest} pixels.")


def resolve(
    model: ModelDefaults,
    prompt: str | Sequence[str],
    *,
    negative_prompt: str | Sequence[str] | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    seed: int | Sequence[int] | None = None,
    latents: mx.array | np.ndarray | None = None,
    image: str | Path | Image.Image | None = None,
    strength: float | None = None,
    num_images: int = 1,
    max_sequence_length: int | None = None,
    skip_layer_guidance: SkipLayerGuidance | bool | None = None,
    sampler: str | None = None,
    shift: float | None = None,
    sigmas: Sequence[float] | None = None,
    output_type: str = "pil",
    vae: str = "full",
    control_image: ImageInput | Sequence[ImageInput] | None = None,
    control_type: str | None = None,
    control_start: float | Sequence[float] | None = None,
    control_end: float | Sequence[float] | None = None,
    mask: ImageInput | None = None,
    mask_blur: float | None = None,
    padding_mask_crop: int | None = None,
    outpaint: Sequence[int] | None = None,
) -> GenerationRequest:
    """A request with every unset argument taken from the model's defaults, each value checked (one line
    naming the argument and what is allowed)."""
    prompts = _texts(prompt, "prompt")
    if prompts is None:
        raise ValueError("prompt must be a string or a non-empty list of strings, got None.")
    negatives = _texts(negative_prompt, "negative_prompt")
    if negatives is not None and len(negatives) == 1:
        negatives = negatives * len(prompts)
    if negatives is not None and len(negatives) != len(prompts):
        raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts; "
                         "pass one negative prompt, or one per prompt.")
    if vae not in DECODERS:
        raise ValueError(f"vae must be one of {', '.join(DECODERS)}, got {vae!r}.")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}.")
    steps = _count(model.steps if num_inference_steps is None else num_inference_steps, "num_inference_steps",
                   1, NUM_TRAIN_TIMESTEPS)
    guidance = _finite_number(model.guidance if guidance_scale is None else guidance_scale, "guidance_scale",
                              -1e4, 1e4, "a finite number (CFG runs when > 1)")
    num_images = _count(num_images, "num_images", 1, 10_000)
    length = _count(model.max_sequence_length if max_sequence_length is None else max_sequence_length,
                    "max_sequence_length", 1, 512)
    shift = _finite_number(model.shift if shift is None else shift, "shift", 1e-3, 1e3, "a number from 0.001 to 1000")
    if sigmas is not None:
        try:
            sigmas = tuple(float(s) for s in sigmas)
        except (TypeError, ValueError):
            raise ValueError(f"sigmas must be a list of numbers, one per step, got {sigmas!r}.") from None
    sigmas = model.sigmas if sigmas is None else sigmas
    sampler = model.sampler if sampler is None else sampler
    scales = model.scales if sampler == "scale-wise" else None
    sampler_check = _sampler(sampler, scales)
    sampler_check.sigmas(steps, shift, sigmas)  # one line for sigmas of the wrong count, range or order

    slg = model.skip_layer_guidance if skip_layer_guidance in (None, True) else (skip_layer_guidance or None)
    if slg is not None and guidance > 1:
        bad = [i for i in slg.layers if not 0 <= i < model.num_layers]
        if bad:
            raise ValueError(f"skip-layer guidance layers {bad} do not exist (the model has {model.num_layers} "
                             "layers).")
    if negatives is not None and any(negatives) and guidance <= 1:
        log.warning("the negative prompt is ignored: it only acts with classifier-free guidance "
                    "(guidance %g <= 1); pass a guidance above 1 to use it.", guidance)

    edit = _edit(model, image, mask, mask_blur, padding_mask_crop, outpaint, control_image)
    control_source = control_image
    if edit.canvas is not None:
        if image is not None:
            image = edit.canvas
        if model.inpainting_controlnet and (control_image is None or image is None):
            control_source = edit.canvas  # the inpainting ControlNet sees the image it inpaints
    control = _control(model, control_source, control_type, control_start, control_end)
    if image is not None and strength is None and edit.outpaint is not None:
        strength = OUTPAINT_STRENGTH
    image_hash = None
    if image is not None:
        strength = DEFAULT_STRENGTH if strength is None else _finite_number(
            strength, "strength", 0, 1, "in (0, 1] (e.g. 0.6, or 1.0 to ignore the image)")
        if strength == 0:
            raise ValueError("strength must be in (0, 1] (e.g. 0.6, or 1.0 to ignore the image), got 0.")
        image_hash = edit.image_hash if edit.canvas is not None else _image_hash(image)
        image = open_rgb(image)
        if height is None and width is None:
            width, height = (s // model.multiple * model.multiple for s in image.size)
            if not width or not height:
                raise ValueError(f"the input image is {image.size[0]}x{image.size[1]} pixels; img2img needs at "
                                 f"least {model.multiple}x{model.multiple}.")
        if sampler == "scale-wise":
            raise ValueError("the scale-wise sampler starts from small latents and cannot run img2img; "
                             "choose another --sampler or drop the image.")
    elif strength is not None:
        raise ValueError("strength only applies to img2img; pass an image too, or drop strength.")
    elif control.images and height is None and width is None:
        width, height = (max(s // model.multiple, 1) * model.multiple for s in control.images[0].size)
    height = _side(height, "height", model.size, model)
    width = _side(width, "width", model.size, model)
    check_size(height, width, model)
    first_size = sampler_check.latent_size(0, (height // model.latent_factor, width // model.latent_factor))
    for i, picture in enumerate(control.images):
        if picture.size != (width, height):
            log.info("control image %d is %dx%d: resized to %dx%d", i + 1, *picture.size, width, height)

    batch = len(prompts) * num_images
    if latents is not None:
        latents = mx.array(latents).astype(mx.float32)
        shape = (batch, model.latent_channels, *first_size)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} (B, C, H/8, W/8), got {tuple(latents.shape)}.")
    return GenerationRequest(
        prompts=prompts, negative_prompts=negatives, num_images=num_images, steps=steps, guidance=guidance,
        skip_layer_guidance=slg, height=height, width=width, seeds=image_seeds(seed, batch),
        max_sequence_length=length, sampler=sampler, shift=shift, sigmas=sigmas, image=image,
        image_hash=image_hash, strength=strength, latents=latents, output_type=output_type, scales=scales, vae=vae,
        control_images=control.images, control_hashes=control.hashes,
        control_type=control.type, control_start=control.start, control_end=control.end, mask=edit.mask,
        mask_hash=edit.mask_hash, mask_blur=edit.mask_blur, padding_mask_crop=edit.padding_mask_crop,
        outpaint=edit.outpaint,
    )


ImageInput = str | Path | Image.Image


@dataclass(frozen=True)
class _Control:
    images: tuple[Image.Image, ...] = ()
    hashes: tuple[str, ...] = ()
    type: str = "none"
    start: tuple[float, ...] = ()
    end: tuple[float, ...] = ()


def _per_net(value: float | Sequence[float] | None, default: float, name: str, n: int) -> tuple[float, ...]:
    values = [default] if value is None else [value] if isinstance(value, (int, float)) else list(value)
    if len(values) == 1:
        values *= n
    if len(values) != n:
        raise ValueError(f"got {len(values)} values of {name} for {n} ControlNets; pass one, or one per ControlNet.")
    return tuple(_finite_number(v, name, 0, 1, "a fraction of the steps from 0 to 1") for v in values)


def _control(model: ModelDefaults, images, control_type: str | None, start, end) -> _Control:
    """The control images (one per ControlNet), what to compute from them and when each ControlNet acts."""
    n = model.controlnets
    if not n:
        given = [name for name, v in (("control_image", images), ("control_type", control_type),
                                      ("control_start", start), ("control_end", end)) if v is not None]
        if given:
            raise ValueError(f"{given[0]} needs a ControlNet; load one with load_pipeline(..., controlnets=[...]) "
                             "(--controlnet).")
        return _Control()
    if images is None:
        raise ValueError(f"{n} ControlNet{'s' if n > 1 else ''} loaded but no control image; pass control_image= "
                         "(--control-image), one for all or one per ControlNet.")
    images = [images] if isinstance(images, (str, Path, Image.Image)) else list(images)
    if len(images) == 1:
        images *= n
    if len(images) != n:
        raise ValueError(f"got {len(images)} control images for {n} ControlNets; pass one, or one per ControlNet.")
    control_type = control_type or "none"
    if control_type not in CONTROL_TYPES:
        raise ValueError(f"unknown control type {control_type!r}; use one of {', '.join(CONTROL_TYPES)}.")
    starts, ends = _per_net(start, 0.0, "control_start", n), _per_net(end, 1.0, "control_end", n)
    for s, e in zip(starts, ends):
        if s >= e:
            raise ValueError(f"control_start {s:g} must be below control_end {e:g}.")
    opened = tuple(open_rgb(i) for i in images)
    return _Control(opened, tuple(_image_hash(i) for i in images), control_type, starts, ends)


@dataclass(frozen=True)
class _Edit:
    canvas: Image.Image | None = None  # the image painted in (outpainting's padded canvas), RGB
    image_hash: str | None = None  # of the image given
    mask: Image.Image | None = None
    mask_hash: str | None = None
    mask_blur: float = 0.0
    padding_mask_crop: int | None = None
    outpaint: tuple[int, int, int, int] | None = None


def _edit(model: ModelDefaults, image, mask, mask_blur, padding_mask_crop, outpaint, control_image) -> _Edit:
    """Inpainting's mask and outpainting's canvas and mask, checked."""
    if mask is None and outpaint is None:
        for name, value in (("mask_blur", mask_blur), ("padding_mask_crop", padding_mask_crop)):
            if value is not None:
                raise ValueError(f"{name} only applies to inpainting; pass a mask too, or drop {name}.")
        if model.inpainting_controlnet:
            raise ValueError("the inpainting ControlNet needs a mask of what to repaint; pass mask= (--mask).")
        return _Edit()
    target = image if image is not None else control_image if model.inpainting_controlnet else None
    if target is None:
        what = "mask" if outpaint is None else "outpaint"
        raise ValueError(f"{what} needs the image to paint in; pass image= (--image).")
    if isinstance(target, (list, tuple)):
        raise ValueError("inpainting takes one image; pass a single control image with an inpainting ControlNet.")
    picture = open_rgb(target)
    grey = open_mask(mask) if mask is not None else None
    if grey is not None and grey.size != picture.size:
        log.info("the mask is %dx%d, the image %dx%d: the mask is resized to the image", *grey.size, *picture.size)
        grey = grey.resize(picture.size, resample=Image.Resampling.LANCZOS)
    mask_hash = _image_hash(mask) if mask is not None else None
    hashed = _image_hash(target)
    box = None
    if outpaint is not None:
        box = tuple(outpaint)
        if len(box) != 4 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in box):
            raise ValueError(f"outpaint takes four pixel counts LEFT,TOP,RIGHT,BOTTOM, got {outpaint!r}.")
        picture, grey = outpaint_canvas(picture, *box, mask=grey)
    blur = _finite_number(0.0 if mask_blur is None else mask_blur, "mask_blur", 0, 1e3,
                          "a blur radius in pixels from 0 to 1000")
    crop = None if padding_mask_crop is None else _count(padding_mask_crop, "padding_mask_crop", 0, 10**5)
    return _Edit(picture, hashed, grey, mask_hash, blur, crop, tuple(int(v) for v in box) if box else None)
