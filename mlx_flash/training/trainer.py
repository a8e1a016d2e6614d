"""The optimisation loop: AdamW with linear warm-up and cosine decay, gradient accumulation, an optional
exponential moving average of the weights, a loss log, and atomic checkpoints from which `resume` continues
exactly (the same weights as a run never interrupted: batches must depend only on the seed and the step)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

Batch = Callable[[int, int], tuple]  # (step, micro-batch) -> the loss function's arguments
CHECKPOINT = "step-{:08d}"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. `warmup` steps of linear warm-up (at most half the run), then cosine decay to 0;
    `accumulation` micro-batches per step (their gradients averaged); `ema_decay`: keep an average of the weights
    (decay min(ema_decay, (1 + step) / (10 + step))); a checkpoint every `checkpoint_every` steps;
    `group_learning_rates`: (name, peak learning rate) of top-level groups of the trainable parameters trained at
    their own rate (e.g. text-encoder adapters beside the transformer's), on the same schedule."""

    steps: int
    learning_rate: float
    warmup: int = 100
    weight_decay: float = 0.0
    accumulation: int = 1
    ema_decay: float | None = None
    checkpoint_every: int | None = None
    seed: int = 0
    group_learning_rates: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}.")
        for lr in (self.learning_rate, *(lr for _, lr in self.group_learning_rates)):
            if not lr > 0:
                raise ValueError(f"learning rate must be positive, got {lr}.")
        if self.accumulation < 1:
            raise ValueError(f"gradient accumulation must be at least 1 micro-batch, got {self.accumulation}.")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {self.ema_decay}; e.g. 0.999.")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(f"checkpoint interval must be at least 1 step, got {self.checkpoint_every}.")


def learning_rate_schedule(config: TrainConfig, lr: float | None = None) -> Callable[[mx.array], mx.array]:
    """Linear warm-up from lr / warmup to lr (default `config.learning_rate`) over `warmup` steps (at most half
    the run), then cosine decay."""
    warmup = min(config.warmup, config.steps // 2)
    lr = config.learning_rate if lr is None else lr
    if warmup == 0:
        return optim.cosine_decay(lr, config.steps)
    return optim.join_schedules([optim.linear_schedule(lr / warmup, lr, warmup),
                                 optim.cosine_decay(lr, config.steps - warmup)], [warmup])


def adamw(config: TrainConfig, lr: float | None = None) -> optim.AdamW:
    return optim.AdamW(learning_rate=learning_rate_schedule(config, lr), weight_decay=config.weight_decay)


class GroupedAdamW:
    """AdamW whose top-level parameter groups `rates` ({name: peak learning rate}) each have their own optimiser
    (and rate, on the same schedule); every other group is trained at `config.learning_rate`. The parts of
    `mlx.optimizers.Optimizer` that the Trainer uses: init, update, state, learning_rate."""

    def __init__(self, config: TrainConfig, rates: Mapping[str, float]):
        self.rest = adamw(config)
        self.groups = {name: adamw(config, lr) for name, lr in rates.items()}

    def _split(self, tree: dict) -> list[tuple[optim.AdamW, dict]]:
        rest = {k: v for k, v in tree.items() if k not in self.groups}
        return [(self.rest, rest), *((o, {name: tree[name]}) for name, o in self.groups.items() if name in tree)]

    def init(self, parameters: dict) -> None:
        for optimizer, part in self._split(parameters):
            optimizer.init(part)

    def update(self, model: nn.Module, gradients: dict) -> None:
        for optimizer, part in self._split(gradients):
            optimizer.update(model, part)

    @property
    def state(self) -> dict:
        return {"rest": self.rest.state, **{name: o.state for name, o in self.groups.items()}}

    @state.setter
    def state(self, state: dict) -> None:
        self.rest.state = state["rest"]
        for name, optimizer in self.groups.items():
            optimizer.state = state[name]

    @property
    def learning_rate(self) -> mx.array:
        return self.rest.learning_rate


def make_optimizer(config: TrainConfig) -> optim.AdamW | GroupedAdamW:
    """AdamW on the schedule; one per group when the config gives groups their own learning rates."""
    if config.group_learning_rates:
        return GroupedAdamW(config, dict(config.group_learning_rates))
    return adamw(config)


class EMA:
    """Exponential moving average of a model's trainable parameters; short averages early (forgetting the
    initialisation): decay min(decay, (1 + step) / (10 + step))."""

    def __init__(self, params: dict, decay: float):
        self.decay = decay
        self.params = tree_map(lambda p: p, params)

    def update(self, step: int, params: dict) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        self.params = tree_map(lambda e, p: decay * e + (1 - decay) * p, self.params, params)


class StepCallback(Protocol):
    def __call__(self, step: int, loss: float) -> None: ...


class Trainer:
    """Train `model`'s trainable parameters on `loss(*batch(step, micro))`. With `folder`, checkpoints go to
    folder/checkpoints and the loss log to folder/loss.jsonl; `settings` (JSON-ready) are everything else a
    resumed run must share with the checkpoint's (the model, the data, the adapters)."""

    def __init__(self, model: nn.Module, loss: Callable[..., mx.array], batch: Batch, config: TrainConfig,
                 folder: Path | None = None, callbacks: Sequence[StepCallback] = (), settings: dict | None = None):
        self.model, self.batch, self.config, self.folder = model, batch, config, folder
        self.settings = json.loads(json.dumps({**asdict(config), **(settings or {})}))
        self.callbacks = list(callbacks)
        self.optimizer = make_optimizer(config)
        self.optimizer.init(model.trainable_parameters())
        self.value_and_grad = nn.value_and_grad(model, loss)
        self.ema = EMA(model.trainable_parameters(), config.ema_decay) if config.ema_decay else None
        self.step = 0

    # Checkpoints ----------------------------------------------------------------------------------------------

    @property
    def checkpoints(self) -> Path:
        if self.folder is None:
            raise ValueError("this trainer has no folder for checkpoints.")
        return self.folder / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        if self.folder is None or not self.checkpoints.is_dir():
            return None
        done = sorted(p for p in self.checkpoints.iterdir() if p.name.startswith("step-") and p.suffix == "")
        return done[-1] if done else None

    def save_checkpoint(self) -> Path:
        """Write the weights, optimiser state, EMA and step to checkpoints/step-N (a temporary folder renamed
        when complete); older checkpoints are then removed."""
        arrays = {f"model.{k}": v for k, v in tree_flatten(self.model.trainable_parameters())}
        arrays |= {f"optimizer.{k}": v for k, v in tree_flatten(self.optimizer.state)}
        if self.ema is not None:
            arrays |= {f"ema.{k}": v for k, v in tree_flatten(self.ema.params)}
        final = self.checkpoints / CHECKPOINT.format(self.step)
        partial = final.with_suffix(".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        mx.save_safetensors(str(partial / "state.safetensors"), arrays)
        (partial / "trainer.json").write_text(json.dumps({"step": self.step, "settings": self.settings}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in self.checkpoints.iterdir():
            if old != final and old.name.startswith("step-"):
                shutil.rmtree(old, ignore_errors=True)
        return final

    def resume(self) -> int:
        """Continue from the latest checkpoint (ValueError if there is none or it was made with other settings);
        returns its step."""
        path = self.latest_checkpoint()
        if path is None:
            raise ValueError(f"{self.checkpoints}: no checkpoint to resume from; run without --resume to start.")
        saved = json.loads((path / "trainer.json").read_text())
        if saved["settings"] != self.settings:
            changed = [k for k in {**saved["settings"], **self.settings}
                       if saved["settings"].get(k) != self.settings.get(k)]
            raise ValueError(f"{path}: made with other settings ({', '.join(changed)}); resume with the same "
                             "settings or start a new run in another folder.")
        arrays = mx.load(str(path / "state.safetensors"))

        def restore(prefix: str, like: dict) -> dict:  # by the live tree's structure (adapters are keyed "0")
            return tree_map_with_path(lambda key, _: arrays[f"{prefix}.{key}"], like)

        self.model.update(restore("model", self.model.trainable_parameters()))
        self.optimizer.state = restore("optimizer", self.optimizer.state)
        if self.ema is not None:
            self.ema.params = restore("ema", self.ema.params)
        self.step = saved["step"]
        self._truncate_log()
        return self.step

    # The loop -----------------------------------------------------------------------------------------------

    @property
    def log_path(self) -> Path | None:
        return None if self.folder is None else self.folder / "loss.jsonl"

    def _truncate_log(self) -> None:
        if self.log_path is not None and self.log_path.is_file():
            lines = [line for line in self.log_path.read_text().splitlines()
                     if line and json.loads(line)["step"] <= self.step]
            self.log_path.write_text("".join(f"{line}\n" for line in lines))

    def train_step(self) -> float:
        """One optimiser step (over `accumulation` micro-batches); returns the mean loss."""
        self.step += 1
        loss, grads = self.value_and_grad(*self.batch(self.step, 0))
        if self.config.accumulation > 1:
            for micro in range(1, self.config.accumulation):
                more, more_grads = self.value_and_grad(*self.batch(self.step, micro))
                loss, grads = loss + more, tree_map(mx.add, grads, more_grads)
            loss = loss / self.config.accumulation
            grads = tree_map(lambda g: g / self.config.accumulation, grads)
        self.optimizer.update(self.model, grads)
        if self.ema is not None:
            self.ema.update(self.step, self.model.trainable_parameters())
        mx.eval(self.model.parameters(), self.optimizer.state, loss, *([self.ema.params] if self.ema else []))
        return loss.item()

    def run(self) -> list[tuple[int, float]]:
        """Train to `config.steps` from the current step; returns this run's (step, loss) pairs."""
        history = []
        start = time.perf_counter()
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("a") if self.log_path is not None else None
        try:
            while self.step < self.config.steps:
                loss = self.train_step()
                history.append((self.step, loss))
                if log is not None:
                    log.write(json.dumps({"step": self.step, "loss": loss, "learning_rate":
                                          float(self.optimizer.learning_rate.item()),
                                          "seconds": round(time.perf_counter() - start, 3)}) + "\n")
                    log.flush()
                every = self.config.checkpoint_every
                if every and self.folder is not None and (self.step % every == 0 or self.step == self.config.steps):
                    self.save_checkpoint()
                for callback in self.callbacks:
                    callback(self.step, loss)
        finally:
            if log is not None:
                log.close()
        return history

    def final_parameters(self) -> dict:
        """The weights to ship: the EMA's when kept, else the model's."""
        return self.ema.params if self.ema is not None else self.model.trainable_parameters()


def read_log(path: Path) -> list[tuple[int, float]]:
    """(step, loss) pairs of a loss.jsonl."""
    return [(e["step"], e["loss"]) for e in map(json.loads, path.read_text().splitlines()) if e]
