"""Stage 2 of the digit models: the teacher, a tiny SD3.5-architecture (MMDiT-X) transformer trained with
SD3's rectified-flow objective on the VAE latents of the digits, conditioned on prompts encoded by the
model's own text encoders (exactly as the pipeline encodes them), with classifier-free guidance dropout.

    python training/train_digits.py [--model mlx_flash/models/digits] [--steps 4000] [--seed 0]

Needs stage 1 (train_vae.py) in --model. Writes transformer/ (float16, the EMA weights) and mlx_flash.json
(sampling defaults), and a PNG of samples by the pipeline.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import preload_openblas  # noqa: E402
from mlx_flash import load_pipeline  # noqa: E402
from mlx_flash.layout import MANIFEST  # noqa: E402
from mlx_flash.mmdit import MMDiT, MMDiTConfig, save_mmdit  # noqa: E402
from mlx_flash.training import flow_loss, sample_sigmas  # noqa: E402
from mlx_flash.vae import VAEConfig, load_vae  # noqa: E402
from training.common import MODELS, fit, half  # noqa: E402
from training.digits_data import (  # noqa: E402
    TEMPLATES,
    WORDS,
    grid,
    held_out_classifier,
    prompts,
    splits,
    to_digits,
    to_images,
)
from training.encoders import T5_WIDTH, encode  # noqa: E402

TRANSFORMER = MMDiTConfig(
    num_layers=4, num_attention_heads=2, attention_head_dim=32, joint_attention_dim=T5_WIDTH,
    pooled_projection_dim=64, pos_embed_max_size=4, sample_size=8, qk_norm=True, dual_attention_layers=(0, 1),
)
MAX_SEQUENCE_LENGTH = 16  # T5 tokens: every prompt fits; the models' default (mlx_flash.json)
CFG_DROPOUT = 0.1
TEACHER_DEFAULTS = {"num_inference_steps": 28, "guidance_scale": 1.5, "max_sequence_length": MAX_SEQUENCE_LENGTH}


@dataclass
class Prompts:
    """Every training prompt (digit-major, template-minor), then the empty prompt, encoded once."""

    embeds: mx.array  # (10 * templates + 1, 77 + MAX_SEQUENCE_LENGTH, T5_WIDTH)
    pooled: mx.array  # (10 * templates + 1, 64)

    @classmethod
    def encode(cls, root: Path, bits: int | None = None) -> "Prompts":
        """The prompts as the pipeline encodes them in float32, or quantized to `bits`."""
        texts = [p for digit in range(10) for p in prompts(digit)] + [""]
        embeds, pooled = encode(root, texts, MAX_SEQUENCE_LENGTH, bits)
        return cls(mx.array(embeds), mx.array(pooled))

    def index(self, digits: np.ndarray, templates: np.ndarray) -> np.ndarray:
        return digits * len(TEMPLATES) + templates

    @property
    def empty(self) -> int:
        return self.embeds.shape[0] - 1


def scheduler_shift(root: Path) -> float:
    return json.loads((root / "scheduler" / "scheduler_config.json").read_text())["shift"]


def new_transformer(seed: int, config: MMDiTConfig = TRANSFORMER) -> MMDiT:
    """The transformer with adaLN-Zero initialisation: modulations and output projection start at zero."""
    mx.random.seed(seed)
    model = MMDiT(config)
    zero = [block.norm1.linear for block in model.transformer_blocks]
    zero += [block.norm1_context.linear for block in model.transformer_blocks] + [model.norm_out.linear, model.proj_out]
    for layer in zero:
        layer.update({"weight": mx.zeros_like(layer.weight), "bias": mx.zeros_like(layer.bias)})
    return model


def encode_latents(root: Path, images: np.ndarray) -> tuple[mx.array, mx.array, VAEConfig]:
    """Posterior (mean, std) of the images under the model's VAE, and the VAE's config."""
    vae = load_vae(root / "vae", mx.float32)
    moments = [vae.encode(mx.array(images[i : i + 64]), tiled=False) for i in range(0, len(images), 64)]
    mean = mx.concatenate([m for m, _ in moments])
    std = mx.exp(0.5 * mx.concatenate([lv for _, lv in moments]))
    mx.eval(mean, std)
    return mean, std, vae.config


def preview(root: Path, path: Path, seeds: int = 5) -> float:
    """Generate each digit `seeds` times with the pipeline's defaults, save a grid (digits in columns) and
    return the held-out classifier's accuracy on them."""
    pipe = load_pipeline(root, dtype="float32")
    texts = [f"a handwritten digit {WORDS[d]}" for _ in range(seeds) for d in range(10)]
    images = pipe.generate(texts, seed=list(range(len(texts))), output_type="np", progress=False)
    grid(images, 10).save(path)
    labels = np.tile(np.arange(10), seeds)
    return float((held_out_classifier().predict(to_digits(images).reshape(len(images), -1)) == labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MODELS / "digits")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preview", type=Path, default=Path("teacher_samples.png"))
    args = parser.parse_args()
    preload_openblas()

    (digits, labels), _ = splits()
    mean, std, vae_config = encode_latents(args.model, to_images(digits))
    table = Prompts.encode(args.model)
    shift = scheduler_shift(args.model)
    model = new_transformer(args.seed)
    rng = np.random.default_rng(args.seed)

    def batch(step: int) -> tuple:
        i = rng.choice(len(digits), args.batch, replace=False)
        rows = table.index(labels[i], rng.integers(len(TEMPLATES), size=args.batch))
        rows = np.where(rng.random(args.batch) < CFG_DROPOUT, table.empty, rows)
        rows, i = mx.array(rows), mx.array(i)
        latents = mean[i] + std[i] * mx.random.normal(mean[i].shape)
        x0 = vae_config.to_diffusion(latents)
        sigmas = sample_sigmas(mx.random.normal((args.batch,)), shift)
        return x0, mx.random.normal(x0.shape), sigmas, table.embeds[rows], table.pooled[rows]

    ema = fit(model, lambda *b: flow_loss(model, *b), batch, args.steps, args.lr, warmup=200, ema_decay=0.999)
    model.update(ema)
    save_mmdit(args.model / "transformer", half(model))
    (args.model / MANIFEST).write_text(json.dumps({"defaults": TEACHER_DEFAULTS}, indent=2))
    print(f"preview accuracy {preview(args.model, args.preview):.3f}")


if __name__ == "__main__":
    main()
