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

from .image_io import open_rgb
from .presets import SkipLayerGuidance
from .sampler import NUM_TRAIN_TIMESTEPS
from .version import __version__

log = logging.getLogger("mlx_flash")

SEED_LIMIT = 2**64  # MLX's random keys take unsigned 64-bit seeds
OUTPUT_TYPES = ("pil", "np", "mlx", "latent")
DECODERS = ("full", "tiny")  # the VAE, or the tiny autoencoder (fast, small, lower quality)
DEFAULT_STRENGTH = 0.6


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

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.num_images

    @property
    def cfg(self) -> bool:
        return self.guidance > 1

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
    sigmas = model.sigmas if sigmas is None else tuple(sigmas)

    slg = model.skip_layer_guidance if skip_layer_guidance in (None, True) else (skip_layer_guidance or None)
    if slg is not None and guidance > 1:
        bad = [i for i in slg.layers if not 0 <= i < model.num_layers]
        if bad:
            raise ValueError(f"skip-layer guidance layers {bad} do not exist (the model has {model.num_layers} "
                             "layers).")
    if negatives is not None and any(negatives) and guidance <= 1:
        log.warning("the negative prompt is ignored: it only acts with classifier-free guidance "
                    "(guidance %g <= 1); pass a guidance above 1 to use it.", guidance)

    image_hash = None
    if image is not None:
        strength = DEFAULT_STRENGTH if strength is None else _finite_number(
            strength, "strength", 0, 1, "in (0, 1] (e.g. 0.6, or 1.0 to ignore the image)")
        if strength == 0:
            raise ValueError("strength must be in (0, 1] (e.g. 0.6, or 1.0 to ignore the image), got 0.")
        image_hash = _image_hash(image)
        image = open_rgb(image)
        if height is None and width is None:
            width, height = (s // model.multiple * model.multiple for s in image.size)
            if not width or not height:
                raise ValueError(f"the input image is {image.size[0]}x{image.size[1]} pixels; img2img needs at "
                                 f"least {model.multiple}x{model.multiple}.")
    elif strength is not None:
        raise ValueError("strength only applies to img2img; pass an image too, or drop strength.")
    height = _side(height, "height", model.size, model)
    width = _side(width, "width", model.size, model)
    check_size(height, width, model)

    batch = len(prompts) * num_images
    if latents is not None:
        latents = mx.array(latents).astype(mx.float32)
        shape = (batch, model.latent_channels, height // model.latent_factor, width // model.latent_factor)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} (B, C, H/8, W/8), got {tuple(latents.shape)}.")
    return GenerationRequest(
        prompts=prompts, negative_prompts=negatives, num_images=num_images, steps=steps, guidance=guidance,
        skip_layer_guidance=slg, height=height, width=width, seeds=image_seeds(seed, batch),
        max_sequence_length=length, sampler=model.sampler if sampler is None else sampler, shift=shift,
        sigmas=sigmas, image=image, image_hash=image_hash, strength=strength, latents=latents,
        output_type=output_type, vae=vae,
    )
