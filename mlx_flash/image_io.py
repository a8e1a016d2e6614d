"""PNG output with generation metadata, and image input for img2img, as diffusers' VaeImageProcessor does it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

METADATA_KEY = "mlx_flash"
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
    data = png_bytes(image, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "wb" if overwrite else "xb") as f:
            f.write(data)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; pass --force to overwrite it or choose a new name.") from None
    return path


def png_bytes(image: Image.Image, metadata: Metadata) -> bytes:
    """`image` encoded as PNG with one text chunk per metadata field plus all of them as JSON (key "mlx_flash")."""
    if METADATA_KEY in metadata:
        raise ValueError(f"metadata key {METADATA_KEY!r} is reserved; rename that field.")
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    info.add_text(METADATA_KEY, json.dumps(metadata))
    data = io.BytesIO()
    image.save(data, format="PNG", pnginfo=info)
    return data.getvalue()


def next_free_path(path: str | Path) -> Path:
    """`path` if it is free, else the first free of `stem-1.suffix`, `stem-2.suffix`, ..."""
    path = Path(path)
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file; check the path.")
    try:
        return Image.open(path)
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image file PIL can read; pass a PNG, JPEG or WebP image.") from None


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
        return ImageOps.exif_transpose(image).convert("RGB")
    path = Path(image)
    with _open(path) as opened:
        try:
            return ImageOps.exif_transpose(opened).convert("RGB")
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
