"""Shared by the training scripts: where the shipped models live, a seeded Adam loop with an EMA of the
weights, and float16 copies for shipping."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

MODELS = Path(__file__).resolve().parents[1] / "mlx_flash" / "models"


def half(model: nn.Module) -> nn.Module:
    """The model with its floating-point parameters in float16 (how the shipped folders store them)."""
    model.update(tree_map(lambda p: p.astype(mx.float16) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))
    return model


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
    """Train `model` for `steps` AdamW steps on `loss_fn(*batch(step))` (learning rate: linear warm-up, then
    cosine decay to 0). Returns the exponential moving average of the parameters when `ema_decay` is set."""
    warmup = min(warmup, steps // 2)
    schedule = optim.join_schedules(
        [optim.linear_schedule(lr / warmup, lr, warmup), optim.cosine_decay(lr, steps - warmup)], [warmup])
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.0)
    value_and_grad = nn.value_and_grad(model, loss_fn)
    ema = tree_map(lambda p: p, model.trainable_parameters()) if ema_decay else None
    start, total = time.perf_counter(), 0.0
    for step in range(1, steps + 1):
        loss, grads = value_and_grad(*batch(step))
        optimizer.update(model, grads)
        if ema is not None:
            decay = min(ema_decay, (1 + step) / (10 + step))  # short averages early: forget the initialisation
            ema = tree_map(lambda e, p: decay * e + (1 - decay) * p, ema, model.trainable_parameters())
        mx.eval(model.parameters(), optimizer.state, ema, loss)
        total += loss.item()
        if step % log_every == 0 or step == steps:
            print(f"step {step}/{steps}  loss {total / (log_every if step % log_every == 0 else step % log_every):.5f}"
                  f"  {time.perf_counter() - start:.0f} s", flush=True)
            total = 0.0
    return ema
