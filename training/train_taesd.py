"""Stage 4 of the digit models: a tiny autoencoder (diffusers' AutoencoderTiny architecture, 16 wide) distilled
from their VAE, for live previews and `--vae tiny`, and the VAE's least-squares latent-to-RGB preview map.

    python training/train_taesd.py [--models DIR ...] [--steps 600] [--pool 1024] [--seed 0]

The model folders (default: the shipped `digits`, whose VAE `digits-flash`, a model on it, shares) share one VAE
(checked, byte for byte); the tiny autoencoder is written (float16) to each folder's taesd/, and the map into each
mlx_flash.json as "latent_rgb".
Prints the errors of both against the VAE on held-out digits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import preload_openblas  # noqa: E402
from mlx_flash.layout import MANIFEST, read_manifest  # noqa: E402
from mlx_flash.preview import MANIFEST_KEY, LatentRGB, fit_latent_rgb, latent_preview  # noqa: E402
from mlx_flash.taesd import (  # noqa: E402
    MODEL_FOLDER,
    TinyAutoencoder,
    TinyConfig,
    load_tiny_autoencoder,
    save_tiny_autoencoder,
)
from mlx_flash.vae import Autoencoder, load_vae  # noqa: E402
from training.common import MODELS, fit, half  # noqa: E402
from training.digits_data import splits, to_images  # noqa: E402

# 16 channels throughout; the decoder does its work at low resolution (no block at full size), which makes it
# faster than the digit VAE's decoder on the CPU.
TINY = TinyConfig(encoder_block_out_channels=(16,) * 4, decoder_block_out_channels=(16,) * 4,
                  num_encoder_blocks=(1, 1, 2, 2), num_decoder_blocks=(2, 2, 1, 0))
BLEND = 0.5  # the fraction of the pool's latents that blend two images'


def shared_vae(models: list[Path]) -> Path:
    """The VAE folder of the model folders, after checking that they all have the same one."""
    folders = [model / "vae" for model in models]
    for name in ("config.json", "model.safetensors"):
        if len({(folder / name).read_bytes() for folder in folders}) != 1:
            raise SystemExit(f"the digit models' VAEs differ ({name}); train one tiny autoencoder per model instead.")
    return folders[0]


def posterior(vae: Autoencoder, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of the VAE's posterior of each image, in diffusion space."""
    c, means, stds = vae.config, [], []
    for i in range(0, len(images), 64):
        mean, logvar = vae.encode(mx.array(images[i : i + 64]), tiled=False)
        means.append(np.array(c.to_diffusion(mean)))
        stds.append(np.array(mx.exp(0.5 * logvar) * c.scaling_factor))
    return np.concatenate(means), np.concatenate(stds)


def latent_pool(vae: Autoencoder, mean: np.ndarray, std: np.ndarray, size: int, rng: np.random.Generator):
    """`size` diffusion-space latents and the VAE's decodes of them: posterior samples of random training images,
    a `BLEND` fraction of them mixed with another image's (u z1 + (1 - u) z2, u uniform: like the blurred clean
    estimates of early sampling steps, which previews show)."""
    first, second = rng.integers(len(mean), size=(2, size))
    noise = rng.standard_normal((2, size, *mean.shape[1:]), dtype=np.float32)
    z1, z2 = mean[first] + std[first] * noise[0], mean[second] + std[second] * noise[1]
    u = np.where(rng.random(size) < BLEND, rng.random(size), 1.0).astype(np.float32)[:, None, None, None]
    latents = u * z1 + (1 - u) * z2
    decodes = [np.array(vae.latents_to_image(mx.array(latents[i : i + 64]), tiled=False))
               for i in range(0, size, 64)]
    return latents, np.concatenate(decodes)


def write_manifest(folder: Path, key: str, value: dict) -> None:
    """Set `key` in the folder's mlx_flash.json (written to a temporary name, then renamed)."""
    manifest = {**read_manifest(folder), key: value}
    path = folder / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, nargs="+", default=[MODELS / "digits"])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pool", type=int, default=1024, help="latents decoded once by the VAE to train on")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--fit", type=int, default=512, help="training digits the preview map is fitted on")
    parser.add_argument("--held-out", type=int, default=600, help="held-out digits the errors are reported on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    preload_openblas()
    start = time.perf_counter()

    vae = load_vae(shared_vae(args.models), mx.float32)
    (digits, _), (held_out, _) = splits()
    images = to_images(digits)
    mean, std = posterior(vae, images)
    rng = np.random.default_rng(args.seed)
    latents, decodes = latent_pool(vae, mean, std, args.pool, rng)
    print(f"pool of {args.pool} latents decoded in {time.perf_counter() - start:.0f} s", flush=True)

    mx.random.seed(args.seed)
    model = TinyAutoencoder(TINY)

    def loss(z, target, x, x_latents):
        decode = ((model.decode(z) - target) ** 2).mean()
        encode = ((model.encode(x) - x_latents) ** 2).mean()
        return decode + encode

    def batch(step: int) -> tuple:
        pick, own = rng.integers(args.pool, size=args.batch), rng.integers(len(images), size=args.batch)
        return (mx.array(latents[pick]), mx.array(decodes[pick]), mx.array(images[own]), mx.array(mean[own]))

    fit(model, loss, batch, args.steps, args.lr, warmup=50, log_every=100)
    for folder in args.models:
        save_tiny_autoencoder(folder / MODEL_FOLDER, half(model))
    factors = fit_latent_rgb(vae, mx.array(mean[: args.fit])).to_dict()
    for folder in args.models:
        write_manifest(folder, MANIFEST_KEY, factors)
    print(f"trained and written in {time.perf_counter() - start:.0f} s", flush=True)

    shipped = load_tiny_autoencoder(args.models[0] / MODEL_FOLDER, mx.float32)
    real = to_images(held_out[: args.held_out])
    real_mean, _ = posterior(vae, real)
    full = np.clip(np.array(vae.latents_to_image(mx.array(real_mean), tiled=False)), -1, 1)
    tiny = np.clip(np.array(shipped.decode(mx.array(real_mean))), -1, 1)
    encoded = np.array(shipped.encode(mx.array(real)))
    linear = np.array(latent_preview(mx.array(real_mean), LatentRGB.from_dict(factors), vae.config.factor))
    print(f"held-out linear preview: mean |preview - VAE| {np.abs(linear - (full + 1) / 2).mean():.4f}")
    print(f"held-out ({len(real)} digits): decode mean |tiny - VAE| {np.abs(tiny - full).mean() / 2:.4f} "
          f"(of the [0, 1] range); encode mean |tiny - VAE mean| {np.abs(encoded - real_mean).mean():.4f} "
          f"(latent std {real_mean.std():.3f})")


if __name__ == "__main__":
    main()
