"""A PNG of the loss curve, drawn with Pillow: each step's loss and its running mean, on labelled axes."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

SIZE = (720, 400)
MARGIN = (64, 24, 24, 40)  # left, top, right, bottom


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of each value and up to `window - 1` before it."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    starts = np.maximum(np.arange(len(values)) + 1 - window, 0)
    return (sums[1:] - sums[starts]) / (np.arange(len(values)) + 1 - starts)


def plot_losses(history: Sequence[tuple[int, float]], path: Path, title: str = "training loss") -> Path:
    """Draw the (step, loss) pairs to `path` (written to a temporary name, then renamed)."""
    steps = np.array([s for s, _ in history], dtype=np.float64)
    losses = np.array([v for _, v in history], dtype=np.float64)
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN[0], MARGIN[1], SIZE[0] - MARGIN[2], SIZE[1] - MARGIN[3]
    draw.rectangle((left, top, right, bottom), outline="black")
    draw.text((left, 4), title, fill="black")
    if len(steps):
        low, high = float(losses.min()), float(losses.max())
        high = high if high > low else low + 1.0
        first = float(steps[0])
        last = float(steps[-1]) if steps[-1] > first else first + 1.0

        def point(step: float, loss: float) -> tuple[float, float]:
            return (left + (step - first) / (last - first) * (right - left),
                    bottom - (loss - low) / (high - low) * (bottom - top))

        draw.line([point(s, v) for s, v in zip(steps, losses)], fill=(170, 190, 230), width=1)
        smooth = running_mean(losses, max(1, len(losses) // 20))
        draw.line([point(s, v) for s, v in zip(steps, smooth)], fill=(20, 60, 160), width=2)
        for value in (low, (low + high) / 2, high):
            y = point(first, value)[1]
            draw.line((left - 4, y, left, y), fill="black")
            draw.text((4, y - 6), f"{value:.4g}", fill="black")
        for step in (first, (first + last) / 2, last):
            x = point(step, low)[0]
            draw.line((x, bottom, x, bottom + 4), fill="black")
            draw.text((x - 12, bottom + 8), f"{step:.0f}", fill="black")
        draw.text((right - 150, top + 6), "loss, running mean", fill=(20, 60, 160))
    temporary = path.with_name(f".{path.stem}.partial.png")
    image.save(temporary, format="PNG")
    temporary.replace(path)
    return path
