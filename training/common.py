"""Shared by the training scripts: where the shipped models live, the library's training loop with a log line
every few hundred steps, and float16 copies for shipping."""

from __future__ import annotations

import filecmp
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from mlx_flash.files import write_atomic
from mlx_flash.layout import MANIFEST, read_manifest
from mlx_flash.training.trainer import TrainConfig, Trainer

MODELS = Path(__file__).resolve().parents[1] / "mlx_flash" / "models"


def half(model: nn.Module) -> nn.Module:
    """The model with its floating-point parameters in float16 (how the shipped folders store them)."""
    model.update(tree_map(lambda p: p.astype(mx.float16) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))
    return model


def write_scheduler(root: Path, shift: float) -> None:
    """The model's scheduler/scheduler_config.json: SD3's flow-matching Euler scheduler at `shift`."""
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": shift}, indent=2))


def make_model_on_base(folder: Path, base: str) -> None:
    """Make `folder`, whose components other than its transformer are those of the packaged model `base`, a model
    on that base (`mlx_flash.loading.on_base`): only its transformer/ and the manifest entries that differ stay."""
    shared = [p for p in folder.iterdir() if p.is_dir() and p.name != "transformer"]
    for component in shared:
        same = filecmp.dircmp(component, MODELS / base / component.name)
        if same.left_only or same.right_only or same.diff_files or same.funny_files:
            raise ValueError(f"{component} differs from {base}'s; {folder} cannot be a model on {base}.")
    own = read_manifest(folder)
    inherited = read_manifest(MODELS / base)
    manifest = {"base": base} | {k: v for k, v in own.items() if inherited.get(k) != v}
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=2).encode(), overwrite=True)
    for component in shared:
        shutil.rmtree(component)


class PrintLoss:
    """Prints the mean loss every `every` steps (and at the last step)."""

    def __init__(self, steps: int, every: int = 100):
        self.steps, self.every, self.total, self.start = steps, every, 0.0, time.perf_counter()

    def __call__(self, step: int, loss: float) -> None:
        self.total += loss
        if step % self.every == 0 or step == self.steps:
            count = self.every if step % self.every == 0 else step % self.every
            print(f"step {step}/{self.steps}  loss {self.total / count:.5f}  {time.perf_counter() - self.start:.0f} s",
                  flush=True)
            self.total = 0.0


def fit(
    model: nn.Module,
    loss_fn: Callable[..., mx.array],
    batch: Callable[[int], tuple],
    steps: int,
    lr: float,
    warmup: int = 100,
    ema_decay: float | None = None,
    log_every: int = 100,
) -> dict | None:
    """Train `model` for `steps` AdamW steps on `loss_fn(*batch(step))` with the library's Trainer (linear
    warm-up, then cosine decay to 0). Returns the exponential moving average of the parameters when
    `ema_decay` is set."""
    config = TrainConfig(steps=steps, learning_rate=lr, warmup=warmup, ema_decay=ema_decay)
    trainer = Trainer(model, loss_fn, lambda step, micro: batch(step), config, callbacks=[PrintLoss(steps, log_every)])
    trainer.run()
    return trainer.ema.params if trainer.ema is not None else None
