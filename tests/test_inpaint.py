"""Inpainting inputs against diffusers' VaeImageProcessor (the StableDiffusion3InpaintPipeline's image and mask
processors) and torch's nearest-neighbour mask downsampling; outpainting's canvas and mask."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageDraw

from mlx_flash.inpaint import (
    blend,
    blur_mask,
    crop_region,
    image_pixels,
    latent_mask,
    mask_pixels,
    open_mask,
    outpaint,
    overlay,
    resize_crop,
    resize_fill,
)

IMAGE_PROCESSOR = VaeImageProcessor(vae_scale_factor=8, vae_latent_channels=16)
MASK_PROCESSOR = VaeImageProcessor(vae_scale_factor=8, vae_latent_channels=16, do_normalize=False, do_binarize=True,
                                   do_convert_grayscale=True)


def photo(seed: int, size=(72, 56)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1] // 4, size[0] // 4, 3), dtype=np.uint8)).resize(size)


def mask(seed: int, size=(72, 56)) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("L", size)
    x, y = int(rng.integers(0, size[0] - 12)), int(rng.integers(0, size[1] - 12))
    ImageDraw.Draw(image).ellipse((x, y, x + int(rng.integers(4, 30)), y + int(rng.integers(4, 30))), fill=255)
    return image


CASES = [(seed, w, h, pad) for seed in range(6) for (w, h), pad in [((32, 32), 0), ((48, 32), 4), ((32, 64), 9)]]


@pytest.mark.parametrize("seed,width,height,pad", CASES)
def test_crop_and_resize_equal_diffusers(seed, width, height, pad):
    m, image = mask(seed), photo(seed)
    box = crop_region(m, width, height, pad)
    assert box == VaeImageProcessor.get_crop_region(m, width, height, pad=pad)
    assert resize_fill(image.crop(box), width, height).tobytes() == \
        IMAGE_PROCESSOR._resize_and_fill(image.crop(box), width, height).tobytes()
    ref_crop = IMAGE_PROCESSOR._resize_and_crop(image, width, height)
    assert resize_crop(image, width, height).tobytes() == ref_crop.tobytes()
    for crop, mode in ((None, "default"), (box, "fill")):
        ref_image = IMAGE_PROCESSOR.preprocess(image, height=height, width=width, crops_coords=crop, resize_mode=mode)
        assert np.array_equal(image_pixels(image, width, height, crop), ref_image.numpy().transpose(0, 2, 3, 1))
        blurred = blur_mask(m, 3)
        ref_mask = MASK_PROCESSOR.preprocess(blurred, height=height, width=width, crops_coords=crop, resize_mode=mode)
        ours = mask_pixels(blurred, width, height, crop)
        assert np.array_equal(ours, ref_mask.numpy().transpose(0, 2, 3, 1))
        ref_latent = torch.nn.functional.interpolate(ref_mask, size=(height // 8, width // 8)).numpy()
        assert np.array_equal(np.array(latent_mask(ours, 8)), ref_latent.transpose(0, 2, 3, 1))


def test_blur_is_pils_and_diffusers():
    m = mask(1)
    assert blur_mask(m, 5).tobytes() == VaeImageProcessor.blur(m, 5).tobytes()
    assert blur_mask(m, 0) is m


@pytest.mark.parametrize("seed", range(4))
def test_overlay_equals_diffusers(seed):
    original, m, generated = photo(seed), blur_mask(mask(seed), 2), photo(seed + 10, (32, 48))
    box = crop_region(m, 32, 48, 3)
    ref = IMAGE_PROCESSOR.apply_overlay(m, original, generated, box)
    assert overlay(original, generated, m, box).tobytes() == ref.tobytes()


def test_blend():
    rng = np.random.default_rng(0)
    x, image, noise = (mx.array(rng.standard_normal((2, 4, 4, 16)).astype(np.float32)) for _ in range(3))
    m = mx.array((rng.random((2, 4, 4, 1)) > 0.5).astype(np.float32))
    out = np.array(blend(x, image, noise, m, 0.25))
    keep = np.array(m)[..., 0] == 0
    assert np.allclose(out[keep], (0.25 * np.array(noise) + 0.75 * np.array(image))[keep])
    assert np.array_equal(out[~keep], np.array(x)[~keep])


def test_outpaint_canvas_and_mask():
    image = photo(0, (40, 24))
    padded, border = outpaint(image, 8, 0, 16, 8)
    assert padded.size == (64, 32) and border.size == (64, 32)
    b = np.asarray(border)
    assert b[:24, 8:48].max() == 0 and b[:, :8].min() == 255 and b[:, 48:].min() == 255 and b[24:].min() == 255
    assert np.array_equal(np.asarray(padded)[:24, 8:48], np.asarray(image))
    assert np.array_equal(np.asarray(padded)[:24, 0], np.asarray(image)[:, 0])  # the edge pixel carried out
    inner = mask(2, (40, 24))
    assert np.array_equal(np.asarray(outpaint(image, 8, 0, 16, 8, inner).mask)[:24, 8:48], np.asarray(inner))
    with pytest.raises(ValueError, match="LEFT,TOP,RIGHT,BOTTOM"):
        outpaint(image, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="LEFT,TOP,RIGHT,BOTTOM"):
        outpaint(image, -1, 0, 4, 0)


def test_mask_errors(tmp_path):
    with pytest.raises(ValueError, match="the mask is empty"):
        open_mask(Image.new("L", (8, 8)))
    (tmp_path / "mask.png").write_text("not an image")
    with pytest.raises(ValueError, match="not an image file"):
        open_mask(tmp_path / "mask.png")
    with pytest.raises(FileNotFoundError, match="no such mask file"):
        open_mask(tmp_path / "missing.png")
    assert open_mask(Image.new("RGB", (8, 8), (255, 255, 255))).mode == "L"
