"""The NumPy Canny edge detector and Gaussian blur against OpenCV's (a test-only dependency)."""

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from mlx_flash.control_images import canny, control_image, gaussian_blur

cv2 = pytest.importorskip("cv2")  # in the test extra (opencv-python-headless)


def scene(seed: int, size: tuple[int, int] = (96, 80)) -> np.ndarray:
    """Shapes, lines and text on a smooth noisy background: edges of every direction and strength."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    image = Image.fromarray(background).resize(size, Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, size[0] - 10), rng.integers(0, size[1] - 10)
        box = (x0, y0, x0 + rng.integers(5, 40), y0 + rng.integers(5, 40))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        [draw.ellipse, draw.rectangle, draw.line][int(rng.integers(3))](box, fill=color)
    draw.text((int(rng.integers(0, size[0] // 2)), int(rng.integers(0, size[1] // 2))), "Canny 42", fill=(255, 255, 0))
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.5))))
    noisy = np.asarray(image).astype(np.int16) + rng.integers(-6, 7, (size[1], size[0], 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


IMAGES = [scene(seed) for seed in range(8)]


@pytest.mark.parametrize("thresholds", [(100, 200), (30, 90), (200, 100), (0, 0)])
@pytest.mark.parametrize("grey", [False, True])
def test_canny_equals_opencv(thresholds, grey):
    """Identical edge maps: the stated tolerance is zero differing pixels, on every image."""
    differing = edges = 0
    for image in IMAGES:
        pixels = np.asarray(Image.fromarray(image).convert("L")) if grey else image
        ref = cv2.Canny(pixels, *thresholds)
        ours = canny(pixels, *thresholds)
        assert ours.shape == ref.shape and ours.dtype == ref.dtype
        differing += int((ours != ref).sum())
        edges += int((ref > 0).sum())
    print(f"\nthresholds {thresholds} grey={grey}: {differing} differing pixels, {edges} edge pixels in OpenCV's maps")
    assert edges > 100
    assert differing == 0


@pytest.mark.parametrize("size,sigma", [(51, None), (21, None), (7, 1.5), (3, 0.6)])
def test_gaussian_blur_equals_opencv(size, sigma):
    """Within one grey level of OpenCV (its 8-bit path rounds in fixed point)."""
    for image in IMAGES[:3]:
        ref = cv2.GaussianBlur(image, (size, size), sigma or 0)
        ours = gaussian_blur(image, size, sigma)
        assert ours.shape == ref.shape
        assert np.abs(ours.astype(int) - ref).max() <= 1


def test_control_image_types():
    image = Image.fromarray(IMAGES[0])
    edges = control_image(image, "canny")
    assert edges.mode == "RGB" and set(np.unique(np.asarray(edges))) <= {0, 255}
    assert np.asarray(control_image(image, "blur")).std() < np.asarray(image).std()
    assert control_image(image, "none").tobytes() == image.tobytes()
    with pytest.raises(ValueError, match="unknown control type"):
        control_image(image, "depth")
    with pytest.raises(ValueError, match="8-bit"):
        canny(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="odd"):
        gaussian_blur(IMAGES[0], 50)
