"""Fine-tune a model on a folder of captioned images (what `mlx-flash train` runs): LoRA on a float or
quantized (QLoRA) base, optionally with LoRAs on the CLIP text encoders, or full fine-tuning; validation images
through the pipeline; a LoRA file in diffusers / PEFT naming or a full model folder as the output.

Order of memory use: the text encoders run one at a time and are freed, then the VAE encodes and is freed,
and only then does the transformer load for training (with the two CLIP encoders when they are trained: T5's
part of the prompt embeddings stays as computed once).
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from .. import lora
from ..clip import CLIPTextModel, load_clip
from ..components import CLIP_ENCODERS
from ..image_io import save_png
from ..loading import load_pipeline
from ..mmdit import MMDiT, load_mmdit, save_mmdit
from ..pipeline import Pipeline
from ..quantization import Quantization, is_quantized, quantized
from ..text_encoders import join_encodings
from .data import Dataset, build_dataset, read_folder
from .objective import flow_loss, sample_sigmas
from .plot import plot_losses
from .trainer import TrainConfig, Trainer, read_log


@dataclass(frozen=True)
class FinetuneConfig:
    """What to train and on what. `alpha` defaults to `rank`; `targets`: reference (diffusers) module names as
    PEFT matches them, or one regular expression; `quantize`: bits of the frozen base (QLoRA); `class_data`: a
    folder of class images for DreamBooth's prior preservation, weighted `prior_weight`. `train_text_encoder`:
    LoRAs on CLIP-L and CLIP-G too (diffusers' DreamBooth targets, q/k/v/out), of `text_encoder_rank` (default
    `rank`) and alpha (default that rank), at peak learning rate `text_encoder_learning_rate` (diffusers'
    default 5e-6)."""

    model: str
    data: Path
    output: Path
    train: TrainConfig
    rank: int = 16
    alpha: float | None = None
    targets: tuple[str, ...] | str = lora.DREAMBOOTH_TARGETS
    full: bool = False
    train_text_encoder: bool = False
    text_encoder_rank: int | None = None
    text_encoder_alpha: float | None = None
    text_encoder_learning_rate: float = 5e-6
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
        if self.full and self.train_text_encoder:
            raise ValueError("--train-text-encoder trains LoRAs on the CLIP encoders beside a transformer LoRA; "
                             "drop --full, or drop --train-text-encoder.")
        if not self.text_encoder_learning_rate > 0:
            raise ValueError(f"text-encoder learning rate must be positive, got {self.text_encoder_learning_rate}.")
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


class WithTextEncoders(nn.Module):
    """The transformer and the CLIP-L / CLIP-G encoders trained together: the prompt embeddings are computed in
    every step from the captions' CLIP token ids, beside T5's part (computed once)."""

    def __init__(self, transformer: MMDiT, text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModel):
        super().__init__()
        self.transformer, self.text_encoder, self.text_encoder_2 = transformer, text_encoder, text_encoder_2

    def conditioning(self, t5: mx.array, ids_l: mx.array, ids_g: mx.array) -> tuple[mx.array, mx.array]:
        """(embeds, pooled) as the pipeline's text encoders give them (without clip skip)."""
        return join_encodings(self.text_encoder(ids_l), self.text_encoder_2(ids_g), t5, t5.shape[1],
                              self.transformer.config.joint_attention_dim)


def trainable_text_encoders(root: Path, config: FinetuneConfig, dtype: mx.Dtype) -> dict[str, tuple[CLIPTextModel,
                                                                                                    list[str]]]:
    """{component: (CLIP encoder with trainable float32 adapters on its attention projections, their modules)}."""
    rank = config.text_encoder_rank or config.rank
    out = {}
    for component, key in zip(CLIP_ENCODERS, mx.random.split(mx.random.key(config.train.seed + 1), 2)):
        model = load_clip(root / component, dtype)
        modules = lora.target_modules(model, component, lora.TEXT_ENCODER_TARGETS)
        lora.add_adapters(model, component, modules, rank, config.text_encoder_alpha or rank, key)
        out[component] = (model, modules)
    return out


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
                 folder: Path, seed: int, text_encoders: dict[str, CLIPTextModel] | None = None):
        self.pipe, self.model, self.prompts, self.every, self.steps = pipe, model, list(prompts), every, steps
        self.folder, self.seed = folder, seed
        for component, encoder in (text_encoders or {}).items():  # the encoders being trained encode the prompts
            pipe.text_encoders.loaders[component] = lambda folder, dtype, encoder=encoder: encoder

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
        x0, *prompts = dataset.batch(rng, config.batch_size, dropout)
        noise = mx.array(rng.standard_normal(x0.shape, dtype=np.float32))
        normal = mx.array(rng.standard_normal(config.batch_size, dtype=np.float32))
        sigmas = sample_sigmas(normal, shift, config.logit_mean, config.logit_std)
        return x0, noise, sigmas, *prompts

    def batch(step: int, micro: int) -> tuple:
        rng = np.random.default_rng([config.train.seed, step, micro])
        instance = draw(rng, data, config.caption_dropout)
        return (instance,) if prior is None else (instance, draw(rng, prior, 0.0))

    return batch


def batch_loss(model: MMDiT | WithTextEncoders):
    """flow_loss on a batch (x0, noise, sigmas, *prompts): prompts (embeds, pooled), or with trained text
    encoders (T5 embeds, CLIP-L ids, CLIP-G ids), encoded here."""
    if isinstance(model, WithTextEncoders):
        return lambda x0, noise, sigmas, *prompts, weights=None: flow_loss(
            model.transformer, x0, noise, sigmas, *model.conditioning(*prompts), weights=weights)
    return lambda *batch, weights=None: flow_loss(model, *batch, weights=weights)


def make_loss(model: MMDiT | WithTextEncoders, prior_weight: float):
    """The rectified-flow loss of the instance batch, plus `prior_weight` times the class batch's; in one
    forward pass when both batches have the same size (as diffusers' DreamBooth concatenates them)."""
    loss_of = batch_loss(model)

    def loss(instance: tuple, prior: tuple | None = None) -> mx.array:
        if prior is None:
            return loss_of(*instance)
        if instance[0].shape == prior[0].shape and instance[3].shape == prior[3].shape:
            n = instance[0].shape[0]
            weights = mx.concatenate([mx.ones(n), mx.full(prior[0].shape[:1], prior_weight)])
            both = [mx.concatenate(pair) for pair in zip(instance, prior)]
            return 2 * loss_of(*both, weights=weights)
        return loss_of(*instance) + prior_weight * loss_of(*prior)

    return loss


def write_output(config: FinetuneConfig, trained: nn.Module, trainer: Trainer, adapted: dict[str, tuple],
                 root: Path) -> Path:
    """The LoRA file (diffusers / PEFT naming, `lora_adapter_metadata`; with the text encoders' adapters in
    diffusers' `text_encoder.` / `text_encoder_2.` naming) or the full model folder. `adapted`: {component:
    (model, modules, rank, alpha)}."""
    trained.update(trainer.final_parameters())
    dtype = getattr(mx, config.save_dtype)
    if not config.full:
        tensors, configs = {}, {}
        for component, (model, modules, rank, alpha) in adapted.items():
            tensors |= lora.adapter_tensors(model, component, modules, dtype)
            configs[component] = lora.peft_config(modules, rank, alpha)
        return lora.save_lora(config.output, tensors, configs)
    model = adapted["transformer"][0]
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
                             use_t5=config.use_t5, quantize_t5=config.quantize, clip_ids=config.train_text_encoder)

    data = encode(examples)
    prior = encode(class_examples) if class_examples is not None else None
    model, modules = trainable_transformer(pipe.root, config, pipe.dtype)
    adapted = {"transformer": (model, modules, config.rank, config.alpha or config.rank)}
    trained, train = model, config.train
    encoders = trainable_text_encoders(pipe.root, config, pipe.dtype) if config.train_text_encoder else {}
    if encoders:
        trained = WithTextEncoders(model, *(m for m, _ in encoders.values()))
        rank = config.text_encoder_rank or config.rank
        adapted |= {c: (m, found, rank, config.text_encoder_alpha or rank) for c, (m, found) in encoders.items()}
        train = replace(train, group_learning_rates=tuple((c, config.text_encoder_learning_rate) for c in encoders))
    steps = []
    if config.validate_every and config.validation_prompts:
        steps.append(Validation(pipe, model, config.validation_prompts, config.validate_every, train.steps,
                                config.folder / "validation", config.validation_seed,
                                {c: m for c, (m, _) in encoders.items()}))
    trainer = Trainer(trained, make_loss(trained, config.prior_weight), make_batches(data, prior, config, pipe.shift),
                      train, config.folder, settings=config.settings())
    if resume:
        trainer.resume()
    bar = Progress(config.train.steps, trainer.step) if progress else None
    trainer.callbacks = [*([bar] if bar else []), *steps, *callbacks]
    try:
        trainer.run()
    finally:
        if bar:
            bar.close()
    output = write_output(config, trained, trainer, adapted, pipe.root)
    plot_losses(read_log(trainer.log_path), config.folder / "loss.png")
    return output
