"""PNG metadata round trips, overwrite protection, and pixel parity with diffusers' VaeImageProcessor."""

import numpy as np
import pytest
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from mlx_flash.image_io import (
    load_image,
    next_free_path,
    numpy_to_pil,
    read_metadata,
    save_png,
)

METADATA = {
    "prompt": "a café at dusk, 35mm — ünïcode",
    "seed": 1234567890123,
    "steps": 4,
    "cfg": 4.5,
    "skip_layers": [7, 8, 9],
    "negative_prompt": "",
}


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_metadata_round_trip(tmp_path):
    image = random_image(24, 16)
    path = save_png(image, tmp_path / "out" / "deep" / "image.png", METADATA)
    assert path == tmp_path / "out" / "deep" / "image.png"
    assert read_metadata(path) == METADATA
    with Image.open(path) as saved:
        assert saved.text["prompt"] == METADATA["prompt"]
        assert saved.text["seed"] == "1234567890123" and saved.text["cfg"] == "4.5"
        assert saved.text["skip_layers"] == "[7, 8, 9]"
        np.testing.assert_array_equal(np.array(saved), np.array(image))


def test_no_overwrite_unless_asked(tmp_path):
    path = save_png(random_image(8, 8, 1), tmp_path / "image.png", {"seed": 1})
    with pytest.raises(FileExistsError, match="already exists; pass --force to overwrite it or choose a new name"):
        save_png(random_image(8, 8, 2), path, {"seed": 2})
    assert read_metadata(path) == {"seed": 1}
    save_png(random_image(8, 8, 2), path, {"seed": 2}, overwrite=True)
    assert read_metadata(path) == {"seed": 2}


def test_save_png_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="use a .png file name"):
        save_png(random_image(8, 8), tmp_path / "image.jpg", {})
    with pytest.raises(ValueError, match="reserved"):
        save_png(random_image(8, 8), tmp_path / "image.png", {"mlx_flash": 1})
    assert not list(tmp_path.iterdir())


def test_next_free_path(tmp_path):
    path = tmp_path / "image.png"
    assert next_free_path(path) == path
    path.touch()
    assert next_free_path(path) == tmp_path / "image-1.png"
    (tmp_path / "image-1.png").touch()
    assert next_free_path(path) == tmp_path / "image-2.png"


def test_read_metadata_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such image file"):
        read_metadata(tmp_path / "missing.png")
    random_image(8, 8).save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="no mlx-flash metadata"):
        read_metadata(tmp_path / "plain.png")
    random_image(8, 8).save(tmp_path / "photo.jpg")
    with pytest.raises(ValueError, match="a JPEG image, not a PNG"):
        read_metadata(tmp_path / "photo.jpg")
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(ValueError, match="not an image file"):
        read_metadata(tmp_path / "notes.png")


def test_numpy_to_pil_matches_diffusers():
    rng = np.random.default_rng(0)
    images = rng.random((2, 16, 24, 3), dtype=np.float32)
    images[0, 0, :4, 0] = [0.0, 1.0, 0.5 / 255, 1.5 / 255]  # the edges and round-half-to-even cases
    ours, ref = numpy_to_pil(images), VaeImageProcessor.numpy_to_pil(images)
    assert len(ours) == 2
    for a, b in zip(ours, ref):
        assert a.mode == b.mode == "RGB"
        assert a.tobytes() == b.tobytes()


def test_numpy_to_pil_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"shape \(B, H, W, 3\)"):
        numpy_to_pil(np.zeros((16, 16, 3)))


@pytest.mark.parametrize("size", [(48, 32), (37, 53), (100, 70), (8, 8)])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_load_image_matches_vae_image_processor(tmp_path, size, mode):
    width, height = 48, 32
    source = random_image(*size).convert(mode)
    source.save(tmp_path / "in.png")
    ours = load_image(tmp_path / "in.png", width, height)
    rgb = source.convert("RGB")  # diffusers.utils.load_image's conversion
    ref = VaeImageProcessor(vae_scale_factor=8).preprocess(rgb, height=height, width=width)
    assert ours.dtype == np.float32 and ours.shape == (1, height, width, 3)
    np.testing.assert_array_equal(ours, ref.permute(0, 2, 3, 1).numpy())


def test_load_image_applies_exif_orientation(tmp_path):
    image = random_image(32, 16)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    with Image.open(tmp_path / "rotated.jpg") as stored:
        upright = stored.rotate(-90, expand=True)
    ours = load_image(tmp_path / "rotated.jpg", 16, 32)
    np.testing.assert_array_equal(ours[0], np.array(upright).astype(np.float32) / 255.0 * 2.0 - 1.0)


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such image file"):
        load_image(tmp_path / "missing.png", 32, 32)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not an image file"):
        load_image(tmp_path / "notes.txt", 32, 32)
    random_image(32, 32).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:200])
    with pytest.raises(ValueError, match="cannot be decoded"):
        load_image(tmp_path / "cut.png", 32, 32)
    with pytest.raises(ValueError, match="multiples of 16"):
        load_image(tmp_path / "notes.txt", 30, 32)
