"""Callbacks that watch the denoising loop: a progress bar, live previews, cancellation."""

from __future__ import annotations

import threading
from typing import Callable

import mlx.core as mx
from tqdm import tqdm

from .denoise import Callback, StepState


class ProgressBar(Callback):
    """A tqdm bar over the steps of a run."""

    def __init__(self, description: str = "denoising"):
        self.description = description
        self._bar: tqdm | None = None

    def on_start(self, num_steps: int, start: int) -> None:
        self._bar = tqdm(total=num_steps - start, desc=self.description, leave=False)

    def on_step(self, state: StepState) -> None:
        self._bar.update()

    def on_end(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Cancel(Callback):
    """Stops a run after the step during which `cancel()` was called (from any thread or a signal handler)."""

    def __init__(self, event: threading.Event | None = None):
        self.event = event or threading.Event()

    def cancel(self) -> None:
        self.event.set()

    def on_step(self, state: StepState) -> bool:
        return not self.event.is_set()


class Preview(Callback):
    """Calls `show(step, images)` with the clean-image estimate x0 of every `every`-th step (and the last),
    decoded by `decode` (latents (B, h, w, 16) -> images (B, H, W, 3) in [0, 1]; e.g. the tiny autoencoder or
    the weight-free linear map). `step` counts from 1."""

    def __init__(self, show: Callable[[int, mx.array], None], decode: Callable[[mx.array], mx.array],
                 every: int = 1):
        if every < 1:
            raise ValueError(f"preview every must be at least 1 step, got {every}.")
        self.show, self.decode, self.every = show, decode, every

    def on_step(self, state: StepState) -> None:
        step = state.index + 1
        if step % self.every == 0 or step == state.num_steps:
            self.show(step, self.decode(state.x0))
