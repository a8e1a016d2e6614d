"""Control images computed from an ordinary image, in NumPy: the Canny edge map the canny ControlNets take and
the Gaussian blur Stability's SD3.5 blur ControlNet takes. Ready-made maps (depth, pose, tile) pass as images.

`canny` reproduces OpenCV's `cv2.Canny(image, low, high)` (3x3 Sobel, L1 gradient magnitude, its non-maximum
suppression and 8-connected hysteresis; on a colour image the channel with the largest gradient per pixel), and
`gaussian_blur` OpenCV's `cv2.GaussianBlur` (reflected borders); tests/test_control_images.py compares both.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CONTROL_TYPES = ("canny", "blur", "none")
CANNY_THRESHOLDS = (100, 200)  # the thresholds of the InstantX and Stability canny ControlNets' examples
BLUR_KERNEL = 51  # Stability's blur ControlNet: a ~50 pixel Gaussian kernel (odd size, as a centred kernel needs)
TAN_22_5 = 13573  # tan(22.5 degrees) in Q15 fixed point, as OpenCV's Canny compares gradient directions


def _sobel(channel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel derivatives (x, y) of a 2-D array with replicated borders, in integers."""
    p = np.pad(channel.astype(np.int64), 1, mode="edge")
    dx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    dy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return dx, dy


def _gradients(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, the derivatives of the channel with the largest L1 gradient (the first on ties)."""
    channels = image[..., None] if image.ndim == 2 else image
    dx, dy = map(np.stack, zip(*(_sobel(channels[..., c]) for c in range(channels.shape[-1]))))
    best = np.argmax(np.abs(dx) + np.abs(dy), axis=0)[None]
    return np.take_along_axis(dx, best, 0)[0], np.take_along_axis(dy, best, 0)[0]


def _thin(mag: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Non-maximum suppression: whether each pixel is a local maximum across its gradient direction."""
    p = np.pad(mag, 1)  # zero magnitude outside the image

    def at(dy_: int, dx_: int) -> np.ndarray:
        return p[1 + dy_ : p.shape[0] - 1 + dy_, 1 + dx_ : p.shape[1] - 1 + dx_]

    x, y = np.abs(dx), np.abs(dy) << 15
    tg22 = x * TAN_22_5
    horizontal = y < tg22
    vertical = ~horizontal & (y > tg22 + (x << 16))
    same_sign = (dx ^ dy) >= 0
    diagonal = np.where(same_sign, (mag > at(-1, -1)) & (mag > at(1, 1)), (mag > at(-1, 1)) & (mag > at(1, -1)))
    return np.where(horizontal, (mag > at(0, -1)) & (mag >= at(0, 1)),
                    np.where(vertical, (mag > at(-1, 0)) & (mag >= at(1, 0)), diagonal))


def _hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """The weak pixels 8-connected (through weak pixels) to a strong one, and the strong ones."""
    height, width = strong.shape
    stride = width + 2
    edges, candidates = np.pad(strong, 1).ravel(), np.pad(weak, 1).ravel()  # a border nothing grows into
    offsets = np.array([-stride - 1, -stride, -stride + 1, -1, 1, stride - 1, stride, stride + 1])
    frontier = np.flatnonzero(edges)
    while frontier.size:
        reached = np.unique((frontier[:, None] + offsets).ravel())
        frontier = reached[candidates[reached] & ~edges[reached]]
        edges[frontier] = True
    return edges.reshape(height + 2, stride)[1:-1, 1:-1]


def canny(image: Image.Image | np.ndarray, low: float = CANNY_THRESHOLDS[0],
          high: float = CANNY_THRESHOLDS[1]) -> np.ndarray:
    """The Canny edge map (H, W) uint8, 255 on edges, of an 8-bit grey or colour image, as `cv2.Canny`."""
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ValueError(f"canny takes an 8-bit grey or colour image, got an array {pixels.dtype} {pixels.shape}.")
    low, high = sorted((int(np.floor(low)), int(np.floor(high))))
    dx, dy = _gradients(pixels)
    mag = np.abs(dx) + np.abs(dy)
    candidates = (mag > low) & _thin(mag, dx, dy)
    strong = candidates & (mag > high)
    return _hysteresis(strong, candidates & ~strong).astype(np.uint8) * 255


def gaussian_kernel(size: int, sigma: float | None = None) -> np.ndarray:
    """A normalised 1-D Gaussian of odd `size` taps; `sigma` defaults to OpenCV's rule for that size,
    0.3 ((size - 1) / 2 - 1) + 0.8 (OpenCV's own kernel above 7 taps; below, it uses fixed binomial ones)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"the blur kernel size must be odd and positive, got {size}.")
    sigma = sigma or 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    taps = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    return taps / taps.sum()


def gaussian_blur(image: Image.Image | np.ndarray, size: int = BLUR_KERNEL, sigma: float | None = None) -> np.ndarray:
    """The image blurred by a separable `size` x `size` Gaussian with reflected borders (as
    `cv2.GaussianBlur(image, (size, size), sigma)`), same shape, uint8."""
    pixels = np.asarray(image).astype(np.float64)
    kernel, r = gaussian_kernel(size, sigma), size // 2
    for axis in (0, 1):
        pad = [(0, 0)] * pixels.ndim
        pad[axis] = (r, r)
        padded = np.pad(pixels, pad, mode="reflect")
        n = pixels.shape[axis]
        pixels = sum(w * np.take(padded, np.arange(i, i + n), axis=axis) for i, w in enumerate(kernel))
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def control_image(image: Image.Image, control_type: str = "none") -> Image.Image:
    """The RGB control image a ControlNet takes, from `image`: its Canny edges ("canny"), its Gaussian blur
    ("blur"), or the image itself ("none": an edge, depth or pose map made elsewhere)."""
    if control_type not in CONTROL_TYPES:
        raise ValueError(f"unknown control type {control_type!r}; use one of {', '.join(CONTROL_TYPES)}.")
    image = image.convert("RGB")
    if control_type == "canny":
        return Image.fromarray(canny(image)).convert("RGB")
    if control_type == "blur":
        return Image.fromarray(gaussian_blur(image))
    return image
