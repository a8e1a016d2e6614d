"""Stage 1 of the digit models: tokenizers, frozen random text encoders, the scheduler config and the VAE
(SD3's architecture at a small width, trained as an autoencoder with a small KL weight).

    python training/train_vae.py [--out mlx_flash/models/digits] [--steps 300] [--seed 0]

Writes tokenizer*/, text_encoder*/, scheduler/ and vae/ (float16) under --out, and a PNG of real images
above their reconstructions by the shipped (float16) VAE.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import preload_openblas  # noqa: E402
from mlx_flash.vae import Autoencoder, VAEConfig, load_vae, save_vae  # noqa: E402
from training.common import MODELS, fit, half, write_scheduler  # noqa: E402
from training.digits_data import grid, prompts, splits, to_images  # noqa: E402
from training.encoders import write_text_encoders  # noqa: E402

VAE = VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8)
KL_WEIGHT = 2e-3
SHIFT = 3.0  # the flow-matching shift of training and sampling (scheduler_config.json), SD3's


def vae_loss(model: Autoencoder, images: mx.array, noise: mx.array, kl_weight: float = KL_WEIGHT) -> mx.array:
    """Mean squared reconstruction error of a posterior sample plus `kl_weight` x the mean KL to N(0, 1)."""
    mean, logvar = model.encode(images, tiled=False)
    recon = model.decode(mean + mx.exp(0.5 * logvar) * noise, tiled=False)
    kl = 0.5 * (mean**2 + mx.exp(logvar) - 1 - logvar)
    return ((recon - images) ** 2).mean() + kl_weight * kl.mean()


def latent_statistics(vae: Autoencoder, images: np.ndarray) -> tuple[float, float]:
    """(mean, std) of posterior samples over `images`: SD3's shift_factor and 1 / scaling_factor."""
    samples = []
    for i in range(0, len(images), 64):
        mean, logvar = vae.encode(mx.array(images[i : i + 64]), tiled=False)
        noise = mx.random.normal(mean.shape, key=mx.random.key(i))
        samples.append(np.array(mean + mx.exp(0.5 * logvar) * noise))
    samples = np.concatenate(samples)
    return float(samples.mean()), float(samples.std())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=MODELS / "digits")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preview", type=Path, default=Path("vae_reconstructions.png"))
    args = parser.parse_args()
    preload_openblas()

    write_text_encoders(args.out, args.seed, [p for digit in range(10) for p in prompts(digit)])
    write_scheduler(args.out, SHIFT)

    (digits, _), (held_out, _) = splits()
    images = to_images(digits)
    mx.random.seed(args.seed)
    model = Autoencoder(VAE)
    rng = np.random.default_rng(args.seed)

    def batch(step: int) -> tuple:
        x = mx.array(images[rng.choice(len(images), args.batch, replace=False)])
        return x, mx.random.normal((args.batch, 8, 8, VAE.latent_channels))

    fit(model, lambda x, noise: vae_loss(model, x, noise), batch, args.steps, args.lr, warmup=50, log_every=25)
    save_vae(args.out / "vae", half(model))

    shipped = load_vae(args.out / "vae", mx.float32)
    shift, std = latent_statistics(shipped, images)
    config = json.loads((args.out / "vae" / "config.json").read_text())
    config.update(shift_factor=shift, scaling_factor=1 / std)
    (args.out / "vae" / "config.json").write_text(json.dumps(config, indent=2))
    print(f"latents: shift_factor {shift:.4f}, scaling_factor {1 / std:.4f}")

    real = to_images(held_out[:20])
    mean, _ = shipped.encode(mx.array(real), tiled=False)
    recon = np.clip(np.array(shipped.decode(mean, tiled=False)), -1, 1)
    print(f"held-out reconstruction MSE {((recon - real) ** 2).mean():.5f}")
    grid(np.concatenate([real, recon]) / 2 + 0.5, 20).save(args.preview)


if __name__ == "__main__":
    main()
