"""Images are read correctly (issue #12, item 8): 16-bit and other non-8-bit modes scaled, every other mode as
diffusers converts it, sizes checked from the header before decoding, and a batch decoded one image at a time
so many small images are not refused for memory they do not need."""

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from test_hardening_cli import png_header

import mlx_flash
from mlx_flash import image_io
from mlx_flash.image_io import load_image, open_rgb
from mlx_flash.vae import load_vae

W, H = 64, 32
RAMP = np.linspace(0, 1, W * H).reshape(H, W)  # every grey level from black to white


def as_8bit_rgb(values: np.ndarray) -> np.ndarray:
    """The expected pixels: values in [0, 1] rounded to 8 bits, grey in all three channels, in [-1, 1]."""
    grey = (np.clip(values, 0, 1) * 255).round().astype(np.float32) / 255
    return (2 * np.repeat(grey[..., None], 3, axis=-1) - 1)[None]


@pytest.mark.parametrize("mode, image", [
    ("I;16", lambda: Image.fromarray((RAMP * 65535).round().astype(np.uint16))),
    ("I", lambda: Image.fromarray((RAMP * 65535).round().astype(np.int32))),
    ("F", lambda: Image.fromarray(RAMP.astype(np.float32))),
])
@pytest.mark.parametrize("as_file", [True, False])
def test_wide_modes_are_scaled_not_clipped(tmp_path, mode, image, as_file):
    source = image()
    assert source.mode == mode
    path = tmp_path / ("in.png" if mode == "I;16" else "in.tif")
    source.save(path)
    ours = load_image(path if as_file else source, W, H)
    np.testing.assert_allclose(ours, as_8bit_rgb(RAMP), atol=1.01 / 127.5)  # within one 8-bit step
    assert ours.min() == -1 and ours.max() == 1 and abs(ours.mean()) < 0.01  # the whole ramp, not white
    if mode == "I;16":
        assert (np.asarray(Image.open(path).convert("RGB")) == 255).mean() > 0.99  # what Pillow alone reads


@pytest.mark.parametrize("mode", ["L", "LA", "P", "PA", "RGBA", "CMYK", "1", "RGB", "YCbCr", "HSV"])
def test_other_modes_as_diffusers_converts_them(tmp_path, mode):
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (H, W, 4), dtype=np.uint8), "RGBA")
    image = rgba.convert(mode) if mode not in ("P", "PA") else rgba.convert("RGB").quantize(64).convert(mode)
    expected = np.asarray(image.convert("RGB"), np.float32)[None] / 127.5 - 1  # diffusers' load_image
    np.testing.assert_allclose(load_image(image, W, H), expected, atol=1e-6)
    if mode not in ("YCbCr", "HSV", "PA"):  # modes a PNG (CMYK: a TIFF) can hold
        path = tmp_path / ("in.tif" if mode == "CMYK" else "in.png")
        image.save(path)
        np.testing.assert_allclose(load_image(path, W, H), expected, atol=1e-6)


def test_size_checked_from_the_header_before_decoding(tmp_path, monkeypatch):
    (tmp_path / "huge.png").write_bytes(png_header(9000, 9000))  # no pixel data: decoding it would fail
    with pytest.raises(ValueError, match=r"huge.png: the image is too large \(9000x9000\)"):
        open_rgb(tmp_path / "huge.png")
    Image.new("RGB", (W, H)).save(tmp_path / "ok.png")
    monkeypatch.setattr(image_io, "MAX_INPUT_PIXELS", W * H - 1)
    with pytest.raises(ValueError, match=rf"too large \({W}x{H}\)"):
        load_image(tmp_path / "ok.png", W, H)


def test_batch_decoded_one_image_at_a_time(tiny_pipeline_dir):
    vae = load_vae(tiny_pipeline_dir / "vae", mx.float32)
    latents = mx.random.normal((3, H // 8, W // 8, 16), key=mx.random.key(0))
    batch = vae.latents_to_image(latents)
    singles = mx.concatenate([vae.latents_to_image(latents[i : i + 1]) for i in range(3)])
    whole = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor)  # all at once
    assert np.array_equal(np.array(batch), np.array(singles))
    np.testing.assert_allclose(np.array(batch), np.array(whole), atol=1e-5)


def test_many_small_images_need_one_images_decoder_memory(tiny_pipeline_dir):
    pipe = mlx_flash.load_pipeline(tiny_pipeline_dir, dtype="float32", low_memory=True)
    one, many = (next(s for s in pipe.estimate_memory(64, 64, images=n) if s.name == "vae decoder")
                 for n in (1, 64))
    print(f"\nVAE decoder activations: 1 image {one.activations / 1e6:.1f} MB, 64 images {many.activations / 1e6:.1f} MB")
    assert many.activations < 2 * one.activations  # not 64 times: one image is decoded at a time
    assert many.activations - one.activations >= 63 * 64 * 64 * 3 * 4  # but every decoded image is kept
