"""PNG output with generation metadata, and image input for img2img, as diffusers' VaeImageProcessor does it."""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from .files import write_atomic

METADATA_KEY = "mlx_flash"
MAX_INPUT_PIXELS = 8192 * 8192  # inputs are resized to at most the model's size; larger ones are refused unread
# Modes whose values are not 8-bit: the largest value of their range (16-bit integers; floats in [0, 1]).
WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}
Metadata = dict[str, str | int | float | list | None]


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, H, W, 3) floats in [0, 1] -> RGB images, rounded as diffusers: `(x * 255).round().astype(uint8)`."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images of shape (B, H, W, 3), got {images.shape}; add the batch axis or use RGB.")
    return [Image.fromarray(image) for image in (images * 255).round().astype(np.uint8)]


def save_png(image: Image.Image, path: str | Path, metadata: Metadata, *, overwrite: bool = False) -> Path:
    """Write `image` as PNG with one text chunk per metadata field plus all of them as JSON (key "mlx_flash").

    Parent folders are created; an existing file is only replaced with `overwrite=True`.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: images are written as PNG; use a .png file name.")
    if METADATA_KEY in metadata:
        raise ValueError(f"metadata key {METADATA_KEY!r} is reserved; rename that field.")
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    info.add_text(METADATA_KEY, json.dumps(metadata))
    data = io.BytesIO()
    image.save(data, format="PNG", pnginfo=info)
    return write_atomic(path, data.getvalue(), overwrite=overwrite)


def check_writable(paths: Iterable[str | Path]) -> None:
    """Raise OSError unless files can be created at `paths` (before any work whose result would be lost):
    each path's folder, or the nearest existing folder above it, must accept a new file."""
    for path in paths:
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder; pass a file name ending in .png.")
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder} is a file, not a folder; choose another output path.")
        try:
            fd, probe = tempfile.mkstemp(prefix=".mlx-flash-probe-", dir=folder)
        except OSError as err:
            raise OSError(f"{folder}: cannot write there ({err.strerror}); choose another output folder.") from None
        os.close(fd)
        os.unlink(probe)


def next_free_path(path: str | Path) -> Path:
    """`path` if it is free, else the first free of `stem-1.suffix`, `stem-2.suffix`, ..."""
    path = Path(path)
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def _open(path: Path) -> Image.Image:
    """Open an image lazily (only its header is read) and refuse it if its size is beyond MAX_INPUT_PIXELS."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file; check the path.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image file PIL can read; pass a PNG, JPEG or WebP image.") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        image = None
    if image is None or image.width * image.height > MAX_INPUT_PIXELS:
        size = "" if image is None else f" ({image.width}x{image.height})"
        raise ValueError(f"{path}: the image is too large{size}, more than {MAX_INPUT_PIXELS // 10**6} megapixels; "
                         "downscale it first.")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with the full value range of any mode: 16-bit and float greys are scaled to 8 bits (Pillow's own
    conversion clips them), colour and palette modes converted as diffusers does (alpha dropped)."""
    scale = WIDE_MODES.get(image.mode)
    if scale is None:
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float64) / scale
    grey = (np.clip(np.nan_to_num(values), 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def read_metadata(path: str | Path) -> Metadata:
    """The metadata `save_png` wrote into a PNG, with its original types."""
    path = Path(path)
    with _open(path) as image:
        if image.format != "PNG":
            raise ValueError(f"{path}: a {image.format} image, not a PNG; pass a PNG that mlx-flash wrote.")
        text = image.text.get(METADATA_KEY)
    if text is None:
        raise ValueError(f"{path}: no mlx-flash metadata in this PNG; pass an image that mlx-flash generated.")
    return json.loads(text)


def open_rgb(image: str | Path | Image.Image) -> Image.Image:
    """An image file or PIL image as RGB with its EXIF orientation applied (diffusers.utils.load_image)."""
    if isinstance(image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(image))
    path = Path(image)
    with _open(path) as opened:
        try:
            return to_rgb(ImageOps.exif_transpose(opened))
        except OSError as err:
            raise ValueError(f"{path}: the image data cannot be decoded ({err}); re-save or replace the file.") from err


def load_image(image: str | Path | Image.Image, width: int, height: int) -> np.ndarray:
    """Read an img2img input as (1, height, width, 3) float32 in [-1, 1], resized with Lanczos when its size
    differs (VaeImageProcessor's default)."""
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        raise ValueError(f"image size must be positive multiples of 16 (got {width}x{height}); e.g. 1024x1024.")
    rgb = open_rgb(image)
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), resample=Image.Resampling.LANCZOS)
    pixels = np.array(rgb).astype(np.float32) / 255.0
    return (2.0 * pixels - 1.0)[None]
