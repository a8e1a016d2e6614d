"""Fine-tune a model on a folder of captioned images (what `mlx-flash train` runs): LoRA on a float or
quantized (QLoRA) base, or full fine-tuning; validation images through the pipeline; a LoRA file in diffusers /
PEFT naming or a full model folder as the output.

Order of memory use: the text encoders run one at a time and are freed, then the VAE encodes and is freed,
and only then does the transformer load for training.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .. import lora
from ..image_io import save_png
from ..loading import load_pipeline
from ..mmdit import MMDiT, load_mmdit, save_mmdit
from ..pipeline import Pipeline
from ..quantization import Quantization, is_quantized, quantized
from .data import Dataset, build_dataset, read_folder
from .objective import flow_loss, sample_sigmas
from .plot import plot_losses
from .trainer import TrainConfig, Trainer, read_log


@dataclass(frozen=True)
class FinetuneConfig:
    """What to train and on what. `alpha` defaults to `rank`; `targets`: reference (diffusers) module names as
    PEFT matches them, or one regular expression; `quantize`: bits of the frozen base (QLoRA); `class_data`: a
    folder of class images for DreamBooth's prior preservation, weighted `prior_weight`."""

    model: str
    data: Path
    output: Path
    train: TrainConfig
    rank: int = 16
    alpha: float | None = None
    targets: tuple[str, ...] | str = lora.DREAMBOOTH_TARGETS
    full: bool = False
    quantize: int | None = None
    dtype: str | None = None
    resolution: int = 512
    batch_size: int = 1
    flip: bool = False
    caption_dropout: float = 0.0
    max_sequence_length: int = 77
    use_t5: bool = True
    gradient_checkpointing: bool = True
    class_data: Path | None = None
    prior_weight: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    validation_prompts: tuple[str, ...] = ()
    validate_every: int | None = None
    validation_seed: int = 0
    work_dir: Path | None = None
    force: bool = False
    save_dtype: str = "float32"

    def __post_init__(self):
        if self.full and self.quantize:
            raise ValueError("full fine-tuning trains every weight, so it cannot train a quantized base; drop "
                             "--quantize, or train a LoRA on it (QLoRA).")
        if self.quantize is not None:
            Quantization(self.quantize)
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}.")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption dropout must be in [0, 1), got {self.caption_dropout}.")
        if self.full and self.output.suffix == ".safetensors":
            raise ValueError(f"{self.output}: full fine-tuning writes a model folder; pass a folder name as --output.")
        if not self.full and self.output.suffix != ".safetensors":
            raise ValueError(f"{self.output}: a LoRA is written as one .safetensors file; name it e.g. "
                             f"{self.output.name}.safetensors (or pass --full to write a model folder).")

    @property
    def folder(self) -> Path:
        """Checkpoints, caches, the loss log and validation images: beside the output unless given."""
        return self.work_dir or self.output.with_name(self.output.stem + ".train")

    def settings(self) -> dict:
        """What a resumed run must share with its checkpoints."""
        fields = asdict(self)
        for name in ("output", "train", "validation_prompts", "validate_every", "validation_seed", "work_dir",
                     "force", "save_dtype"):
            fields.pop(name)
        return {k: str(v) if isinstance(v, Path) else v for k, v in fields.items()}


def trainable_transformer(root: Path, config: FinetuneConfig, dtype: mx.Dtype) -> tuple[MMDiT, list[str]]:
    """The transformer to train and the LoRA's modules (none for full fine-tuning): a frozen base (in `dtype`,
    quantized to `config.quantize` bits) with float32 adapters, or every weight trainable."""
    model = load_mmdit(root / "transformer", dtype, float32_residual=dtype == mx.float16)
    model.set_training(True, config.gradient_checkpointing)
    if config.full:
        if is_quantized(model):
            raise ValueError(f"{root}: the transformer is stored quantized; full fine-tuning needs a float model.")
        return model, []
    model = quantized(model, config.quantize)
    modules = lora.target_modules(model, "transformer", config.targets)
    lora.add_adapters(model, "transformer", modules, config.rank, config.alpha or config.rank,
                      mx.random.key(config.train.seed))
    return model, modules


class Progress:
    """A tqdm bar over the steps with the running loss (steps/s is tqdm's rate)."""

    def __init__(self, steps: int, start: int):
        self.bar = tqdm(total=steps, initial=start, unit="step", desc="training", dynamic_ncols=True)
        self.mean: float | None = None

    def __call__(self, step: int, loss: float) -> None:
        self.mean = loss if self.mean is None else 0.9 * self.mean + 0.1 * loss
        self.bar.set_postfix(loss=f"{self.mean:.4f}", refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()


class Validation:
    """Every `every` steps (and at the last), the prompts generated through the pipeline with the model being
    trained, saved as PNGs with their settings and the step."""

    def __init__(self, pipe: Pipeline, model: MMDiT, prompts: Sequence[str], every: int, steps: int,
                 folder: Path, seed: int):
        self.pipe, self.model, self.prompts, self.every, self.steps = pipe, model, list(prompts), every, steps
        self.folder, self.seed = folder, seed

    def __call__(self, step: int, loss: float) -> None:
        if step % self.every and step != self.steps:
            return
        self.pipe.transformer_transforms[:] = [lambda _: self.model]
        checkpointing = self.model.gradient_checkpointing
        self.model.set_training(False)
        request = self.pipe.request(self.prompts, seed=self.seed)
        result = self.pipe.run(request)
        self.model.set_training(True, checkpointing)
        self.folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(result.images):
            save_png(image, self.folder / f"step-{step:06d}-{i}.png", {**result.metadata(i), "training_step": step},
                     overwrite=True)
        self.pipe.release()


def make_batches(data: Dataset, prior: Dataset | None, config: FinetuneConfig, shift: float):
    """batch(step, micro) -> the loss's arguments, drawn from a generator seeded by (seed, step, micro) only,
    so a resumed run draws what an uninterrupted one does."""

    def draw(rng: np.random.Generator, dataset: Dataset, dropout: float) -> tuple:
        x0, embeds, pooled = dataset.batch(rng, config.batch_size, dropout)
        noise = mx.array(rng.standard_normal(x0.shape, dtype=np.float32))
        normal = mx.array(rng.standard_normal(config.batch_size, dtype=np.float32))
        sigmas = sample_sigmas(normal, shift, config.logit_mean, config.logit_std)
        return x0, noise, sigmas, embeds, pooled

    def batch(step: int, micro: int) -> tuple:
        rng = np.random.default_rng([config.train.seed, step, micro])
        instance = draw(rng, data, config.caption_dropout)
        return (instance,) if prior is None else (instance, draw(rng, prior, 0.0))

    return batch


def make_loss(model: MMDiT, prior_weight: float):
    """The rectified-flow loss of the instance batch, plus `prior_weight` times the class batch's; in one
    forward pass when both batches have the same size (as diffusers' DreamBooth concatenates them)."""

    def loss(instance: tuple, prior: tuple | None = None) -> mx.array:
        if prior is None:
            return flow_loss(model, *instance)
        if instance[0].shape == prior[0].shape and instance[3].shape == prior[3].shape:
            n = instance[0].shape[0]
            weights = mx.concatenate([mx.ones(n), mx.full(prior[0].shape[:1], prior_weight)])
            both = [mx.concatenate(pair) for pair in zip(instance, prior)]
            return 2 * flow_loss(model, *both, weights=weights)
        return flow_loss(model, *instance) + prior_weight * flow_loss(model, *prior)

    return loss


def write_output(config: FinetuneConfig, model: MMDiT, trainer: Trainer, modules: list[str], root: Path) -> Path:
    """The LoRA file (diffusers / PEFT naming, `lora_adapter_metadata`) or the full model folder."""
    model.update(trainer.final_parameters())
    dtype = getattr(mx, config.save_dtype)
    if not config.full:
        tensors = lora.adapter_tensors(model, "transformer", modules, dtype)
        alpha = config.alpha or config.rank
        return lora.save_lora(config.output, tensors, {"transformer": lora.peft_config(modules, config.rank, alpha)})
    partial = config.output.with_name(config.output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(root, partial, ignore=shutil.ignore_patterns("transformer"))
    model.set_training(False)
    model.set_dtype(dtype)
    save_mmdit(partial / "transformer", model)
    if config.output.exists():
        shutil.rmtree(config.output)
    partial.rename(config.output)
    return config.output


def check_paths(config: FinetuneConfig, resume: bool) -> None:
    """Refuse to overwrite an output, or to start over a run that has checkpoints, unless told."""
    if config.output.exists() and not config.force and not resume:
        raise FileExistsError(f"{config.output} already exists; pass --force to overwrite it or choose another "
                              "--output.")
    checkpoints = config.folder / "checkpoints"
    if not resume and checkpoints.is_dir() and any(checkpoints.iterdir()):
        raise FileExistsError(f"{config.folder} holds checkpoints of an earlier run; pass --resume to continue it, "
                              "or remove the folder to start again.")


def finetune(config: FinetuneConfig, resume: bool = False, progress: bool = True, callbacks: Sequence = ()) -> Path:
    """Train as `config` says and write its output; `resume` continues from the last checkpoint."""
    examples = read_folder(config.data)
    class_examples = read_folder(config.class_data) if config.class_data is not None else None
    check_paths(config, resume)
    pipe = load_pipeline(config.model, dtype=config.dtype, quantize=config.quantize, use_t5=config.use_t5,
                         low_memory=False)
    pipe.text_encoders.low_memory = True  # validation encodes with one encoder in memory at a time too
    cache = config.folder / "cache"

    def encode(found) -> Dataset:
        return build_dataset(pipe.root, found, cache, resolution=config.resolution, flip=config.flip,
                             max_sequence_length=config.max_sequence_length,
                             joint_attention_dim=pipe.transformer_config.joint_attention_dim, dtype=pipe.dtype,
                             use_t5=config.use_t5, quantize_t5=config.quantize)

    data = encode(examples)
    prior = encode(class_examples) if class_examples is not None else None
    model, modules = trainable_transformer(pipe.root, config, pipe.dtype)
    steps = []
    if config.validate_every and config.validation_prompts:
        steps.append(Validation(pipe, model, config.validation_prompts, config.validate_every, config.train.steps,
                                config.folder / "validation", config.validation_seed))
    trainer = Trainer(model, make_loss(model, config.prior_weight), make_batches(data, prior, config, pipe.shift),
                      config.train, config.folder, settings=config.settings())
    if resume:
        trainer.resume()
    bar = Progress(config.train.steps, trainer.step) if progress else None
    trainer.callbacks = [*([bar] if bar else []), *steps, *callbacks]
    try:
        trainer.run()
    finally:
        if bar:
            bar.close()
    output = write_output(config, model, trainer, modules, pipe.root)
    plot_losses(read_log(trainer.log_path), config.folder / "loss.png")
    return output
