"""The handwritten digits of scikit-learn (8x8, ink 0-16) as 64x64 RGB images, their prompts, and the
digit classifier the quality benchmark and the tests score generated images with."""

from __future__ import annotations

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC

IMAGE_SIZE = 64
HELD_OUT = 600  # real digits kept from the generator for the classifier and the reference statistics
SPLIT_SEED = 0
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten digit {word}",
    "a handwritten digit {num}",
    "the number {num}",
    "the number {word}",
    "the digit {word}",
    "digit {num}",
    "a handwritten {word}",
    "a drawing of the number {num}",
    "{word}",
    "{num}",
)


def prompts(digit: int) -> list[str]:
    """Every training prompt of one digit (words and numerals)."""
    return [t.format(word=WORDS[digit], num=digit) for t in TEMPLATES]


def splits() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((generator digits, labels), (held-out digits, labels)): a fixed stratified split, digits (N, 8, 8) in 0-16."""
    data = load_digits()
    train_x, test_x, train_y, test_y = train_test_split(
        data.images.astype(np.float32), data.target, test_size=HELD_OUT, stratify=data.target, random_state=SPLIT_SEED
    )
    return (train_x, train_y), (test_x, test_y)


def to_images(digits: np.ndarray) -> np.ndarray:
    """8x8 digits (N, 8, 8) in 0-16 -> (N, 64, 64, 3) float32 images in [-1, 1]: dark ink on white, upscaled bicubic."""
    ink = [np.array(Image.fromarray(d / 16, mode="F").resize((IMAGE_SIZE,) * 2, Image.BICUBIC)) for d in digits]
    gray = 1 - 2 * np.clip(np.stack(ink), 0, 1)
    return np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)


def to_digits(images: np.ndarray) -> np.ndarray:
    """Images (N, H, W, 3) in [0, 1] -> (N, 8, 8) digits in 0-16: grey, inverted, averaged over 8x8 blocks."""
    n, h, w, _ = images.shape
    ink = 1 - images.mean(axis=-1)
    return 16 * ink.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4))


def round_trip(digits: np.ndarray) -> np.ndarray:
    """Real digits as the generator sees them, brought back to 8x8 the way generated images are."""
    return to_digits(to_images(digits) / 2 + 0.5)


def classifier(digits: np.ndarray, labels: np.ndarray) -> SVC:
    """An RBF support-vector classifier of 8x8 digits (features: the 64 ink values)."""
    return SVC(gamma=0.001, C=10).fit(digits.reshape(len(digits), -1), labels)


def held_out_classifier() -> SVC:
    """The classifier of the held-out real digits (none of which the generator was trained on)."""
    _, (digits, labels) = splits()
    return classifier(round_trip(digits), labels)


def grid(images: np.ndarray, cols: int) -> Image.Image:
    """(N, H, W, 3) images in [0, 1] as one PNG-ready grid, `cols` per row."""
    n, h, w, c = images.shape
    rows = -(-n // cols)
    canvas = np.ones((rows * cols, h, w, c), np.float32)
    canvas[:n] = images
    canvas = canvas.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)
    return Image.fromarray((canvas * 255).round().astype(np.uint8))


LETTER_TEMPLATES = ("the letter x", "a handwritten letter x", "a handwritten x", "letter x", "a drawing of the letter x")


def letter_x(count: int, seed: int) -> np.ndarray:
    """Handwritten-looking letters X as (count, 8, 8) ink in 0-16, like the digits: two strokes with jittered
    ends and widths drawn at 32x32, averaged down to 8x8."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        canvas = Image.new("F", (32, 32), 0.0)
        draw = ImageDraw.Draw(canvas)
        left, right = rng.uniform(5, 10), rng.uniform(22, 27)
        top, bottom = rng.uniform(3, 8), rng.uniform(24, 29)
        for start, end in (((left, top), (right, bottom)), ((right, top), (left, bottom))):
            jitter = rng.normal(0, 1.2, 4)
            draw.line((start[0] + jitter[0], start[1] + jitter[1], end[0] + jitter[2], end[1] + jitter[3]),
                      fill=1.0, width=int(rng.integers(3, 6)))
        ink = np.asarray(canvas).reshape(8, 4, 8, 4).mean(axis=(1, 3))
        out.append(16 * ink / ink.max())
    return np.stack(out).astype(np.float32)
