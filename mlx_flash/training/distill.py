"""SD3.5-Flash's distillation of an SD3 / SD3.5 teacher into a few-step student (what `mlx-flash distill` runs).

One frozen copy of the teacher's transformer carries the trainable adapters: the student (one per timestep
branch; or, with `full`, full copies of the transformer), and the fake score. Roles switch by the adapters'
shared scales: the teacher is the base with every adapter off, the fake score the base with only its adapter
on, a student branch the base with only its adapter on. Each step (after an optional trajectory warm-up):

1. a student step index k is drawn among the branch's steps and the student's Euler sampler is run k steps from
   seeded noise to x_k (timestep sharing), or the student's clean estimate is re-noised at a random t in the
   branch's range (the ablation);
2. the fake score (and the discriminator head) is trained `fake_updates` times on the student's clean
   estimates with SD3's flow loss, plus the head's loss of real latents (a data folder's, else teacher
   samples) against the student's;
3. the student is trained on DMD's surrogate with the teacher's guided velocity as the real score and the
   fake score's, plus the adversarial generator loss through the fake score's block features.

Branches (split-timestep fine-tuning) train one after the other, each on its half of the steps after the
warm-up (which trains every branch), each with a fresh fake score, and are merged by weight interpolation (`split_ratio` high : low; which share the paper gives
which branch is unverified). Checkpoints, resume and the loss log are the training core's.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten
from PIL import Image
from tqdm import tqdm

from .. import lora
from ..image_io import save_png
from ..layout import MANIFEST, read_manifest
from ..mmdit import MMDiT, load_mmdit, save_mmdit
from ..quantization import quantized
from ..sampler import NUM_TRAIN_TIMESTEPS, flow_sigmas
from . import dmd
from .data import encode_prompts
from .objective import flow_loss
from .trainer import TrainConfig, Trainer, learning_rate_schedule


@dataclass(frozen=True)
class DistillConfig:
    """What to distil. `steps`: the student's Euler steps; `guidance`: the teacher's CFG scale (default its
    model's); `split_boundary` / `split_ratio`: the branches' noise-level boundary and merge weights (high : low);
    `warmup_steps`: trajectory regression onto teacher samples first; `t5_dropout`: fraction of prompts encoded
    without T5; `adversarial_weight` 0 turns the adversarial loss off; `trajectory_weight` > 0 adds trajectory
    guidance (the student's step regressed onto the teacher's over it, `trajectory_substeps` Euler steps)."""

    train: TrainConfig
    steps: int = 4
    guidance: float | None = None
    full: bool = False
    rank: int = 16
    alpha: float | None = None
    fake_rank: int = 16
    targets: tuple[str, ...] | str = lora.DREAMBOOTH_TARGETS
    quantize: int | None = None
    timestep_sharing: bool = True
    split: bool = True
    split_boundary: float = 0.75  # t = 500 before SD3's shift of 3: 3 * 0.5 / (1 + 2 * 0.5)
    min_sigma: float = 0.02  # timestep sharing skips the student's steps below this noise level (DMD's t range)
    split_ratio: tuple[float, float] = (3.0, 7.0)
    adversarial_weight: float = 0.1
    trajectory_weight: float = 0.0
    trajectory_substeps: int = 4
    adversarial_loss: str = "non-saturating"
    feature_block: int | None = None  # default: the middle block
    fake_updates: int = 1
    fake_warmup: int = 0  # steps at the start of each branch that train only the fake score (and head)
    fake_learning_rate: float | None = None
    warmup_steps: int = 0
    t5_dropout: float = 0.0
    batch_size: int = 1
    teacher_samples: int = 16
    teacher_steps: int | None = None
    latent_size: tuple[int, int] | None = None  # (height, width) of the latents; default the model's sample size
    student_init: str | None = None  # a transformer folder (or a model folder holding one) the full student starts from

    def __post_init__(self):
        if self.steps not in (1, 2, 4):
            raise ValueError(f"the student takes 1, 2 or 4 steps, got {self.steps}.")
        if self.student_init is not None and not self.full:
            raise ValueError("a student initialised from another transformer is a full copy of it; add --full.")
        if self.full and self.quantize:
            raise ValueError("a full student trains every weight, so the base cannot be quantized; drop --quantize.")
        if not 0 < self.split_boundary < 1:
            raise ValueError(f"split boundary must be a noise level in (0, 1), got {self.split_boundary}.")
        if len(self.split_ratio) != 2 or min(self.split_ratio) < 0 or sum(self.split_ratio) <= 0:
            raise ValueError(f"split ratio must be two non-negative weights HIGH:LOW, e.g. 3:7; got {self.split_ratio}.")
        if not 0 <= self.t5_dropout <= 1:
            raise ValueError(f"T5 dropout must be in [0, 1], got {self.t5_dropout}.")
        if min(self.fake_updates, self.batch_size, self.teacher_samples, self.trajectory_substeps) < 1:
            raise ValueError("fake updates, batch size, teacher samples and trajectory substeps must each be at "
                             "least 1.")
        if self.warmup_steps >= self.train.steps:
            raise ValueError(f"the trajectory warm-up ({self.warmup_steps} steps) must be shorter than the run "
                             f"({self.train.steps} steps).")
        dmd._check_kind(self.adversarial_loss)

    @property
    def ratio(self) -> float:
        """The high-noise branch's share of the merge."""
        return self.split_ratio[0] / sum(self.split_ratio)


@dataclass(frozen=True)
class Adapters:
    """The adapter names of the student branches and of the fake score, and the scales each has when on."""

    students: tuple[str, ...]
    fake: str
    on: tuple[float, ...]


class Models(nn.Module):
    """The distillation's models on one frozen base: student branches, fake score, discriminator head."""

    def __init__(self, base: MMDiT, config: DistillConfig, modules: Sequence[str], key: mx.array):
        super().__init__()
        branches = 2 if config.split else 1
        keys = mx.random.split(key, branches + 1)
        self.full = config.full
        if config.full:  # copies sharing the base's arrays until trained
            self.students = [MMDiT(base.config) for _ in range(branches)]
            for student in self.students:
                student.update(base.parameters())
                student.set_training(True)
        self.base = base
        self.scales = lora.LoRAScales()
        alpha = config.alpha or config.rank
        students = []
        for b in range(0 if config.full else branches):
            lora.add_adapters(base, "transformer", modules, config.rank, alpha, keys[b], self.scales)
            students.append(str(len(self.scales.values) - 1))
        lora.add_adapters(base, "transformer", modules, config.fake_rank, config.fake_rank, keys[-1], self.scales)
        self.adapters = Adapters(tuple(students), str(len(self.scales.values) - 1), tuple(self.scales.values))
        self.head_keys = iter(mx.random.split(mx.random.split(keys[-1])[1], 3))  # the first head, then fresh ones
        self.head = dmd.DiscriminatorHead(base.config.hidden_size, key=next(self.head_keys))
        self.freeze()  # the base; every adapter, the head and full students are trained (each by its role)
        for layer in lora.lora_layers(base).values():
            layer.unfreeze(keys=[k for k, _ in tree_flatten({"lora": layer["lora"]})], recurse=False)
        self.head.unfreeze()
        for student in self.students if config.full else ():
            student.unfreeze()

    def paths(self, role: str) -> list[str]:
        """The trainable parameters of `role`: "student" (its adapters, or full copies) or "fake" (the fake
        score's adapter and the discriminator head), by path."""
        if role == "student":
            keep = lambda p: p.startswith("students.") or any(f".lora.{a}." in p for a in self.adapters.students)
        else:
            keep = lambda p: p.startswith("head.") or f".lora.{self.adapters.fake}." in p
        return [p for p, _ in tree_flatten(self.trainable_parameters()) if keep(p)]

    def assign(self, arrays: dict[str, mx.array]) -> None:
        """Set parameters by path (as `paths` names them)."""
        for path, value in arrays.items():
            *parents, last = path.split(".")
            node = self
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node[part]
            node[last] = value

    def value_and_grad(self, role: str, loss) -> tuple[mx.array, dict[str, mx.array]]:
        """loss() and its gradients with respect to `role`'s parameters only, {path: gradient}."""
        paths = self.paths(role)
        flat = dict(tree_flatten(self.trainable_parameters()))
        original = {p: flat[p] for p in paths}

        def inner(arrays: dict[str, mx.array]) -> mx.array:
            self.assign(arrays)
            return loss()

        value, grads = mx.value_and_grad(inner)(original)
        self.assign(original)
        return value, grads

    @contextmanager
    def role(self, name: str, branch: int = 0) -> Iterator[MMDiT]:
        """The model to call as the "teacher", the "fake" score or the "student" (branch): the adapters' scales
        switched to that role for the block."""
        on = {"teacher": None, "fake": self.adapters.fake,
              "student": None if self.full else self.adapters.students[branch]}[name]
        self.scales.values[:] = [v if str(i) == on else 0.0 for i, v in enumerate(self.adapters.on)]
        try:
            yield self.students[branch] if name == "student" and self.full else self.base
        finally:
            self.scales.values[:] = self.adapters.on

    def reset_fake(self) -> None:
        """A fresh fake score (up matrices zero: the teacher again) and discriminator head."""
        for layer in lora.lora_layers(self.base).values():
            adapter = layer["lora"].get(self.adapters.fake)
            if adapter is not None:
                adapter["up"] = mx.zeros_like(adapter["up"])
        self.head.update(dmd.DiscriminatorHead(self.base.config.hidden_size, key=next(self.head_keys)).parameters())

    def merged_student(self, ratio: float) -> MMDiT:
        """The student with its branches merged by weight interpolation (ratio * high + (1 - ratio) * low), as
        a plain transformer (LoRA branches fused into the base: destroys the adapters)."""
        if self.full:
            student = self.students[0]
            if len(self.students) == 2:
                high, low = (dict(tree_flatten(s.parameters())) for s in self.students)
                student.load_weights(list(dmd.interpolate(high, low, ratio).items()))
            return student
        weights = [ratio, 1 - ratio] if len(self.adapters.students) == 2 else [1.0]
        self.scales.values[:] = [0.0] * len(self.adapters.on)
        for adapter, weight in zip(self.adapters.students, weights):
            self.scales.values[int(adapter)] = weight * self.adapters.on[int(adapter)]
        lora.fuse_loras(self.base)
        return self.base

    def merged_adapter_tensors(self, modules: Sequence[str], ratio: float) -> dict[str, mx.array]:
        """The LoRA branches merged into one adapter of the summed rank (exactly the interpolated weights), as a
        diffusers / PEFT state dict."""
        merged = "merged"
        for layer in lora.lora_layers(self.base).values():
            adapters = [layer["lora"][a] for a in self.adapters.students]
            layer["lora"][merged] = (dmd.merge_adapters(adapters[0], adapters[1], ratio) if len(adapters) == 2
                                     else adapters[0])
        tensors = lora.adapter_tensors(self.base, "transformer", modules, adapter=merged)
        for layer in lora.lora_layers(self.base).values():
            del layer["lora"][merged]
        return tensors


@dataclass
class Conditions:
    """Encoded prompts: rows of `embeds` / `pooled` with T5 and (`no_t5`) without; `empty` the empty prompt's."""

    embeds: mx.array
    pooled: mx.array
    no_t5_embeds: mx.array
    no_t5_pooled: mx.array
    empty: int

    @property
    def prompts(self) -> int:
        return self.embeds.shape[0]


@dataclass
class RealSide:
    """The discriminator's real side: latents, and the rows of `conditions` holding each one's caption (the
    head sees real and generated latents each with its own prompt)."""

    latents: mx.array
    rows: mx.array
    conditions: Conditions


def encode_conditions(root: Path, prompts: Sequence[str], cache: Path, *, max_sequence_length: int,
                      joint_attention_dim: int, dtype: mx.Dtype, t5: bool) -> Conditions:
    """The prompts (and the empty one, last) encoded with T5 and, when `t5` dropout is used, without."""
    texts = [*prompts, ""]
    kwargs = {"max_sequence_length": max_sequence_length, "joint_attention_dim": joint_attention_dim, "dtype": dtype}
    embeds, pooled = encode_prompts(root, texts, cache, **kwargs)
    plain = encode_prompts(root, texts, cache, use_t5=False, **kwargs) if t5 else (embeds, pooled)
    return Conditions(embeds, pooled, *plain, empty=len(texts) - 1)


class Distiller(Trainer):
    """The training core's Trainer with the distillation's step: two optimisers (student; fake score and head)
    whose states checkpoint together; `losses` holds the last step's terms."""

    def __init__(self, models: Models, config: DistillConfig, conditions: Conditions, shift: float,
                 guidance: float, teacher: tuple[mx.array, mx.array, mx.array] | None,
                 real: RealSide | None, folder: Path | None = None, settings: dict | None = None):
        self.models, self.dconfig, self.conditions, self.guidance = models, config, conditions, guidance
        self.sigmas = flow_sigmas(config.steps, shift)
        self.shift = shift
        self.teacher = teacher  # (noise, prompt rows, samples) of the teacher's sampler
        if real is None and teacher is not None:
            real = RealSide(teacher[2], teacher[1], conditions)
        self.real = real
        c = models.base.config
        self.block = config.feature_block if config.feature_block is not None else c.num_layers // 2
        self.shape = (*(config.latent_size or (c.sample_size, c.sample_size)), c.out_channels)
        super().__init__(models, lambda: mx.array(0.0), lambda step, micro: (), config.train, folder,
                         settings=settings)
        fake_lr = config.fake_learning_rate or config.train.learning_rate
        fake_train = replace(config.train, steps=config.train.steps * config.fake_updates, learning_rate=fake_lr,
                             warmup=config.train.warmup * config.fake_updates)
        self.student_optimizer = optim.AdamW(learning_rate=learning_rate_schedule(config.train),
                                             weight_decay=config.train.weight_decay)
        self.fake_optimizer = optim.AdamW(learning_rate=learning_rate_schedule(fake_train), weight_decay=0.0)
        for role, optimizer in (("student", self.student_optimizer), ("fake", self.fake_optimizer)):
            optimizer.init(self._parameters(role))
        self.optimizer = optim.MultiOptimizer([self.student_optimizer, self.fake_optimizer],
                                              [lambda path, _: False])  # holds both states for checkpoints
        self.losses: dict[str, float] = {}
        if config.timestep_sharing:  # each branch needs a student step in its range: refuse now, not mid-run
            for branch in range(2 if config.split else 1):
                self.branch_steps(branch)

    # What each step sees -------------------------------------------------------------------------------------

    def branch(self, step: int) -> int:
        """The branch trained at `step`: without split 0; with split 0 (t > boundary) in the first half of the
        steps after the warm-up, then 1 (t <= boundary). (The warm-up trains every branch.)"""
        warmup = self.dconfig.warmup_steps
        return int(self.dconfig.split and step > warmup + (self.config.steps - warmup) // 2)

    def phase_start(self, step: int) -> int:
        """The first step of the branch phase `step` is in (after the trajectory warm-up)."""
        warmup = self.dconfig.warmup_steps
        return warmup + 1 + (self.config.steps - warmup) // 2 * self.branch(step)

    def noise_range(self, branch: int) -> tuple[float, float]:
        if not self.dconfig.split:
            return 0.0, 1.0
        b = self.dconfig.split_boundary
        return (b, 1.0) if branch == 0 else (0.0, b)

    def branch_steps(self, branch: int) -> list[int]:
        """The student's step indices whose noise level lies in the branch's range (low, high] and is at least
        `min_sigma` (SD3's schedule puts the last step of a 2- or 4-step student at 0.009: nearly the clean image,
        where the scores barely differ and DMD's normaliser divides by almost nothing)."""
        low, high = self.noise_range(branch)
        floor = max(low, self.dconfig.min_sigma)
        found = [k for k, s in enumerate(self.sigmas[:-1]) if floor <= s <= high and s > low]
        if not found:
            raise ValueError(f"no step of the {self.dconfig.steps}-step student has a noise level in "
                             f"({low}, {high}] of at least {self.dconfig.min_sigma} (its levels: "
                             f"{', '.join(f'{v:.3f}' for v in self.sigmas[:-1])}); timestep sharing needs one: move "
                             "--split-boundary, or use re-noising or no split.")
        return found

    def draw(self, step: int) -> dict:
        """Everything random about a step, from (seed, step) only (so a resumed run draws the same)."""
        rng = np.random.default_rng([self.config.seed, step])
        c, n = self.conditions, self.dconfig.batch_size
        rows = mx.array(rng.integers(c.empty, size=n))
        drop = mx.array(rng.random(n) < self.dconfig.t5_dropout)
        empty = mx.full((n,), c.empty)

        def normal() -> mx.array:
            return mx.array(rng.standard_normal((n, *self.shape), dtype=np.float32))

        low, high = self.noise_range(self.branch(step))
        steps = (self.branch_steps(self.branch(step)) if self.dconfig.timestep_sharing
                 else list(range(self.dconfig.steps)))
        out = {"embeds": mx.where(drop[:, None, None], c.no_t5_embeds[rows], c.embeds[rows]),
               "pooled": mx.where(drop[:, None], c.no_t5_pooled[rows], c.pooled[rows]),
               "teacher_embeds": c.embeds[rows], "teacher_pooled": c.pooled[rows],
               "negative_embeds": c.embeds[empty], "negative_pooled": c.pooled[empty],
               "noise": normal(), "k": int(rng.choice(steps)),
               "t": mx.array(rng.uniform(max(low, 0.02), min(high, 0.98), n).astype(np.float32)),
               "fake_noise": [normal() for _ in range(self.dconfig.fake_updates)], "gan_noise": normal()}
        if self.real is not None:
            j = mx.array(rng.integers(self.real.latents.shape[0], size=n))
            r, rc = self.real.rows[j], self.real.conditions
            out |= {"real": self.real.latents[j],
                    "real_embeds": mx.where(drop[:, None, None], rc.no_t5_embeds[r], rc.embeds[r]),
                    "real_pooled": mx.where(drop[:, None], rc.no_t5_pooled[r], rc.pooled[r])}
        if self.teacher is not None:
            out["pairs"] = mx.array(rng.integers(self.teacher[0].shape[0], size=n))
        return out

    # The step ----------------------------------------------------------------------------------------------

    def _velocity(self, role: str, branch: int, x: mx.array, t: mx.array, d: dict) -> mx.array:
        with self.models.role(role, branch) as model:
            if role == "teacher":
                return dmd.guided_velocity(model, x, t * NUM_TRAIN_TIMESTEPS, d["teacher_embeds"], d["teacher_pooled"],
                                           d["negative_embeds"], d["negative_pooled"], self.guidance)
            return model(x, t * NUM_TRAIN_TIMESTEPS, d["embeds"], d["pooled"])

    def _features(self, x0: mx.array, t: mx.array, noise: mx.array, embeds: mx.array, pooled: mx.array) -> mx.array:
        s = t[:, None, None, None]
        with self.models.role("fake") as model:
            features = dmd.block_features(model, (1 - s) * x0 + s * noise, t * NUM_TRAIN_TIMESTEPS, embeds, pooled,
                                          self.block)
            return self.models.head(features)

    def _parameters(self, role: str) -> dict[str, mx.array]:
        flat = dict(tree_flatten(self.models.trainable_parameters()))
        return {p: flat[p] for p in self.models.paths(role)}

    def _update(self, role: str, optimizer: optim.Optimizer, loss) -> float:
        """One optimiser step of `role`'s parameters on loss(); returns its value."""
        value, grads = self.models.value_and_grad(role, loss)
        self.models.assign(optimizer.apply_gradients(grads, self._parameters(role)))
        mx.eval(self.models.parameters(), optimizer.state, value)
        return value.item()

    def student_point(self, d: dict, branch: int) -> tuple[mx.array, mx.array]:
        """(x_k, sigma_k) of the batch: the student's trajectory point at step k (timestep sharing)."""
        k = d["k"]
        n = d["noise"].shape[0]
        velocity = lambda x, sigma, i: self._velocity("student", branch, x, mx.full((n,), sigma), d)
        return dmd.trajectory_point(velocity, d["noise"], self.sigmas, k), mx.full((n,), float(self.sigmas[k]))

    def train_step(self) -> float:
        self.step += 1
        d, branch = self.draw(self.step), self.branch(self.step)
        if self.step <= self.dconfig.warmup_steps:
            return self._warmup(d)
        if branch and self.branch(self.step - 1) == 0:
            self.reset_fake()
        x_k, s_k = self.student_point(d, branch)
        sk = s_k[:, None, None, None]
        x0 = mx.stop_gradient(x_k - sk * self._velocity("student", branch, x_k, s_k, d))
        t = s_k if self.dconfig.timestep_sharing else d["t"]
        weight, kind = self.dconfig.adversarial_weight, self.dconfig.adversarial_loss
        losses = {}

        for noise in d["fake_noise"]:
            def fake_loss(noise: mx.array = noise) -> mx.array:
                with self.models.role("fake") as model:
                    value = flow_loss(model, x0, noise, t, d["embeds"], d["pooled"])
                if weight and "real" in d:
                    real = self._features(d["real"], t, d["gan_noise"], d["real_embeds"], d["real_pooled"])
                    fake = self._features(x0, t, d["gan_noise"], d["embeds"], d["pooled"])
                    value = value + weight * dmd.discriminator_loss(real, fake, kind)
                return value
            losses["fake"] = self._update("fake", self.fake_optimizer, fake_loss)
        if self.step - self.phase_start(self.step) < self.dconfig.fake_warmup:  # the fake score catches up first
            self.losses = losses
            return losses["fake"]

        if self.dconfig.timestep_sharing:
            x_t = x_k
        else:
            s = t[:, None, None, None]
            x_t = (1 - s) * x0 + s * d["gan_noise"]
        v_real = self._velocity("teacher", branch, x_t, t, d)
        v_fake = self._velocity("fake", branch, x_t, t, d)
        v_teacher = self.teacher_step(d, branch, x_k) if self.dconfig.trajectory_weight else None
        mx.eval(v_real, v_fake, v_teacher)
        terms = {}

        def student_loss() -> mx.array:
            v = self._velocity("student", branch, x_k, s_k, d)
            x0_student = x_k - sk * v
            terms["dm"] = dmd.dm_loss(x0_student, dmd.dm_gradient(x0_student, x_t, t, v_real, v_fake))
            if weight and "real" in d:
                fake = self._features(x0_student, t, d["gan_noise"], d["embeds"], d["pooled"])
                terms["generator"] = dmd.generator_loss(fake, kind)
            if v_teacher is not None:
                terms["trajectory"] = dmd.trajectory_loss(v, v_teacher)
            return (terms["dm"] + weight * terms.get("generator", 0.0)
                    + self.dconfig.trajectory_weight * terms.get("trajectory", 0.0))
        losses["student"] = self._update("student", self.student_optimizer, student_loss)
        self.losses = losses | {k: v.item() for k, v in terms.items()}
        return losses["student"]

    def teacher_step(self, d: dict, branch: int, x_k: mx.array) -> mx.array:
        """Trajectory guidance's target: the teacher's (guided) mean velocity over the student's step k from x_k,
        by `trajectory_substeps` Euler steps."""
        n, k = x_k.shape[0], d["k"]
        velocity = lambda x, sigma, i: self._velocity("teacher", branch, x, mx.full((n,), sigma), d)
        return dmd.segment_velocity(velocity, x_k, float(self.sigmas[k]), float(self.sigmas[k + 1]),
                                    self.dconfig.trajectory_substeps)

    def reset_fake(self) -> None:
        """A fresh fake score, head and optimiser state for the second branch."""
        self.models.reset_fake()
        kept = self.fake_optimizer.state
        self.fake_optimizer.state = {"step": kept["step"], "learning_rate": kept["learning_rate"]}
        self.fake_optimizer.init(self._parameters("fake"))

    def _warmup(self, d: dict) -> float:
        """Trajectory regression (the digit distillation) of every student branch: at the student's noise levels,
        the velocity `noise - x0` on the line from the teacher's sample x0 to its noise (branches summed)."""
        noise, rows, samples = self.teacher
        i = d["pairs"]
        levels = mx.array(self.sigmas[:-1])
        sigmas = levels[mx.array((np.arange(i.shape[0]) + d["k"]) % levels.shape[0])]
        c = self.conditions

        def loss() -> mx.array:
            total = mx.array(0.0)
            for branch in range(2 if self.dconfig.split else 1):
                with self.models.role("student", branch) as model:
                    total = total + flow_loss(model, samples[i], noise[i], sigmas, c.embeds[rows[i]],
                                              c.pooled[rows[i]])
            return total
        self.losses = {"warmup": self._update("student", self.student_optimizer, loss)}
        return self.losses["warmup"]


class Progress:
    """A tqdm bar over the steps showing each loss term of the last step; the terms also go, one JSON line per
    step, to `losses.jsonl` in the work folder (the training core's loss.jsonl holds the student's)."""

    def __init__(self, trainer: Distiller, folder: Path, show: bool = True):
        self.trainer, self.path = trainer, folder / "losses.jsonl"
        self.bar = tqdm(total=trainer.config.steps, initial=trainer.step, unit="step", desc="distilling",
                        dynamic_ncols=True, disable=not show)
        if self.path.is_file():  # drop the lines of steps after the checkpoint resumed from
            lines = [l for l in self.path.read_text().splitlines() if l and json.loads(l)["step"] <= trainer.step]
            self.path.write_text("".join(f"{line}\n" for line in lines))

    def __call__(self, step: int, loss: float) -> None:
        terms = self.trainer.losses
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "branch": self.trainer.branch(step), **terms}) + "\n")
        self.bar.set_postfix({k: f"{v:.4f}" for k, v in terms.items()}, refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()


class Validation:
    """Every `every` steps (and at the last) a grid of the prompts generated by the student (the branch being
    trained) through the pipeline at its few-step settings: validation/step-N.png in the work folder."""

    def __init__(self, pipe, trainer: Distiller, prompts: Sequence[str], every: int, folder: Path, seed: int = 0):
        self.pipe, self.trainer, self.prompts, self.every, self.folder, self.seed = (pipe, trainer, list(prompts),
                                                                                     every, folder, seed)

    def __call__(self, step: int, loss: float) -> None:
        if step % self.every and step != self.trainer.config.steps:
            return
        with self.trainer.models.role("student", self.trainer.branch(step)) as model:
            self.pipe.transformer_transforms[:] = [lambda _: model]
            request = self.pipe.request(self.prompts, seed=self.seed, guidance_scale=1.0,
                                        num_inference_steps=self.trainer.dconfig.steps)
            model.set_training(False)
            try:
                images = self.pipe.run(request).images
            finally:
                model.set_training(True)
        self.pipe.release()
        grid = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)))
        for n, image in enumerate(images):
            grid.paste(image, (sum(i.width for i in images[:n]), 0))
        save_png(grid, self.folder / f"step-{step:06d}.png", {"prompts": self.prompts, "training_step": step,
                                                               "seed": self.seed}, overwrite=True)


def real_side(root: Path, folder: Path, cache: Path, shape: tuple[int, ...], dtype: mx.Dtype,
              encode: Callable[[Sequence[str]], Conditions]) -> RealSide:
    """The diffusion latents (posterior means) of a folder of images, all of the latent size `shape` (height,
    width, channels), with their captions encoded by `encode`."""
    from ..layout import read_json
    from ..vae import VAEConfig
    from .data import encode_images, read_folder

    size = (shape[1] * 8, shape[0] * 8)
    examples = read_folder(folder)
    posteriors = encode_images(root, [(e.image, size, False) for e in examples], cache, dtype)
    vae = VAEConfig.from_dict(read_json(root / "vae" / "config.json"))
    latents = mx.stack([vae.to_diffusion(mean) for mean, _ in posteriors])
    return RealSide(latents, mx.arange(len(examples)), encode([e.caption for e in examples]))


def teacher_samples(models: Models, conditions: Conditions, count: int, steps: int, guidance: float, shift: float,
                    shape: tuple[int, ...], seed: int) -> tuple[mx.array, mx.array, mx.array]:
    """(noise, prompt rows, samples): the teacher's samples from seeded noise with its CFG sampler."""
    models.base.set_training(False)
    rng = np.random.default_rng([seed, 2**31])
    rows = mx.array(np.arange(count) % conditions.empty)
    noise = mx.array(rng.standard_normal((count, *shape), dtype=np.float32))
    sigmas = flow_sigmas(steps, shift)
    out = []
    for start in range(0, count, 32):
        r = rows[start: start + 32]
        n = r.shape[0]
        empty = mx.full((n,), conditions.empty)
        prompts = (conditions.embeds[r], conditions.pooled[r], conditions.embeds[empty], conditions.pooled[empty])
        with models.role("teacher") as model:
            def velocity(x: mx.array, sigma: float, i: int, model=model, n=n, prompts=prompts) -> mx.array:
                return dmd.guided_velocity(model, x, mx.full((n,), sigma * NUM_TRAIN_TIMESTEPS), *prompts, guidance)
            out.append(dmd.trajectory_point(velocity, noise[start: start + n], sigmas, steps))
    models.base.set_training(True)
    return noise, rows, mx.concatenate(out)


def load_models(root: Path, config: DistillConfig, dtype: mx.Dtype,
                transformer: Path | None = None) -> tuple[Models, list[str]]:
    """The teacher's transformer (`transformer`, default root/transformer; quantized to `config.quantize` bits)
    with the distillation's adapters."""
    base = quantized(load_mmdit(transformer or root / "transformer", dtype), config.quantize)
    base.set_training(True)
    modules = lora.target_modules(base, "transformer", config.targets)
    models = Models(base, config, modules, mx.random.key(config.train.seed))
    if config.student_init is not None:
        from ..loading import replacement_transformer

        init = load_mmdit(replacement_transformer(student_transformer(config.student_init), root), dtype)
        for student in models.students:
            student.update(init.parameters())
    return models, modules


def student_transformer(location: str) -> str:
    """The transformer folder of `location`: a packaged model's name or a model folder (its transformer/), or a
    transformer folder as it is."""
    from ..loading import PACKAGED_MODELS

    for folder in (PACKAGED_MODELS / location, Path(location)):
        if (folder / "transformer").is_dir():
            return str(folder / "transformer")
    return location


def write_model(models: Models, config: DistillConfig, modules: Sequence[str], root: Path, output: Path,
                teacher_defaults: dict) -> Path:
    """The output: a LoRA file (.safetensors, branches merged) or a model folder (the teacher's, with the
    merged student's transformer and few-step defaults in its manifest). Temporary name, then renamed."""
    defaults = {"num_inference_steps": config.steps, "guidance_scale": 1.0}
    if "max_sequence_length" in teacher_defaults:
        defaults["max_sequence_length"] = teacher_defaults["max_sequence_length"]
    settings = {k: v for k, v in asdict(config).items() if k != "train"} | {"seed": config.train.seed,
                                                                            "distill_steps": config.train.steps}
    if output.suffix == ".safetensors":
        tensors = models.merged_adapter_tensors(modules, config.ratio)
        rank = config.rank * (2 if config.split else 1)
        alpha = (config.alpha or config.rank) * (2 if config.split else 1)
        return lora.save_lora(output, tensors, {"transformer": lora.peft_config(modules, rank, alpha)})
    student = models.merged_student(config.ratio)
    student.set_training(False)
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(root, partial, ignore=shutil.ignore_patterns("transformer", MANIFEST))
    save_mmdit(partial / "transformer", student)
    manifest = read_manifest(root) | {"defaults": defaults,  # the rest (e.g. the preview map) is the VAE's: kept
                                       "distillation": json.loads(json.dumps(settings, default=str))}
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if output.exists():
        shutil.rmtree(output)
    partial.rename(output)
    return output


def distill(teacher: str, output: Path, prompts: Sequence[str], config: DistillConfig, *, work_dir: Path | None = None,
            data: Path | None = None, resume: bool = False, force: bool = False, validate_every: int | None = None,
            validation_prompts: Sequence[str] = (), progress: bool = True, callbacks: Sequence = ()) -> Path:
    """Distil `teacher` (any name load_pipeline takes) into `output` as `config` says; returns the output.
    `data`: a folder of images whose latents are the discriminator's real side (default: teacher samples)."""
    from ..loading import load_pipeline

    if not prompts:
        raise ValueError("no prompts to distil on; give a file with one prompt per line.")
    if config.full and output.suffix == ".safetensors":
        raise ValueError(f"{output}: a full student is written as a model folder; pass a folder name.")
    if output.exists() and not force and not resume:
        raise FileExistsError(f"{output} already exists; pass --force to overwrite it or choose another output.")
    folder = work_dir or output.with_name(output.name + ".distill")
    if not resume and (folder / "checkpoints").is_dir() and any((folder / "checkpoints").iterdir()):
        raise FileExistsError(f"{folder} holds checkpoints of an earlier run; pass --resume to continue it, or "
                              "remove the folder to start again.")
    pipe = load_pipeline(teacher, dtype="float32", low_memory=False)  # no weights dropped by validation runs
    pipe.text_encoders.low_memory = True
    root, shift, dtype = pipe.root, pipe.shift, pipe.dtype
    defaults = pipe.manifest.get("defaults", {})
    guidance = config.guidance if config.guidance is not None else defaults.get("guidance_scale", 1.0)
    def encode(texts: Sequence[str]) -> Conditions:
        return encode_conditions(root, texts, folder / "cache",
                                 max_sequence_length=defaults.get("max_sequence_length", 77),
                                 joint_attention_dim=pipe.transformer_config.joint_attention_dim, dtype=dtype,
                                 t5=config.t5_dropout > 0)
    conditions = encode(prompts)
    models, modules = load_models(root, config, dtype, pipe.transformer_dir)
    c = models.base.config
    shape = (*(config.latent_size or (c.sample_size, c.sample_size)), c.out_channels)
    real = real_side(root, data, folder / "cache", shape, dtype, encode) if data is not None else None
    needs_teacher = config.warmup_steps > 0 or (config.adversarial_weight > 0 and real is None)
    pairs = teacher_samples(models, conditions, config.teacher_samples,
                            config.teacher_steps or defaults.get("num_inference_steps", 28), guidance, shift, shape,
                            config.train.seed) if needs_teacher else None
    settings = {"teacher": str(teacher), "prompts": list(prompts), "config": json.loads(json.dumps(
        {k: v for k, v in asdict(config).items() if k != "train"}, default=str)), "data": str(data)}
    trainer = Distiller(models, config, conditions, shift, guidance, pairs, real, folder, settings)
    if resume:
        trainer.resume()
    bar = Progress(trainer, folder, progress)
    steps = [Validation(pipe, trainer, validation_prompts, validate_every, folder / "validation")] if (
        validate_every and validation_prompts) else []
    trainer.callbacks = [bar, *steps, *callbacks]
    try:
        trainer.run()
    finally:
        bar.close()
    return write_model(models, config, modules, root, output, defaults)
