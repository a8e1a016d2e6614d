"""Stage 1 of the shapes models: tokenizers, frozen random text encoders, the scheduler config and the VAE
(SD3's architecture at a small width, factor 4, trained as an autoencoder with a small KL weight, as the
digits' in train_vae.py) on drawn training scenes.

    python training/train_shapes_vae.py [--out mlx_flash/models/shapes] [--steps 300] [--seed 0] [--init VAE_FOLDER]

Writes tokenizer*/, text_encoder*/, scheduler/ and vae/ (float16) under --out, and a PNG of drawn scenes above
their reconstructions by the shipped (float16) VAE with the detector's recovery rate on both.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import preload_openblas  # noqa: E402
from mlx_flash.vae import Autoencoder, VAEConfig, load_vae, save_vae  # noqa: E402
from training.common import MODELS, fit, half, write_scheduler  # noqa: E402
from training.encoders import write_text_encoders  # noqa: E402
from training.shapes_data import all_specs, dataset, grid, prompt, split, to_model  # noqa: E402
from training.shapes_detector import detect, layout_matches  # noqa: E402
from training.train_vae import KL_WEIGHT, latent_statistics, vae_loss  # noqa: E402

VAE = VAEConfig(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=8)
IMAGES = 6000  # training scenes (regenerated from the seed by every stage)
DATA_SEED = 1  # the training scenes' seed; the benchmark's held-out scenes use others
SHIFT = 1.0  # flow-matching shift (scheduler_config.json): SD3 trains small latents unshifted; 3.0 is for 128x128


def training_scenes(count: int = IMAGES) -> tuple[np.ndarray, list[str], list]:
    """The training scenes every stage uses: (uint8 images, prompts, layouts) of the training combinations."""
    return dataset(split()[0], count, DATA_SEED)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=MODELS / "shapes")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=IMAGES, help="the first N training scenes")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, default=None, help="continue from this vae/ folder's weights")
    parser.add_argument("--decoder-only", action="store_true",
                        help="train only the decoder (with --init: the latents, and a teacher trained on them, stay)")
    parser.add_argument("--kl-weight", type=float, default=KL_WEIGHT, help="of the KL term (smaller: sharper means)")
    parser.add_argument("--preview", type=Path, default=Path("shapes_vae_reconstructions.png"))
    args = parser.parse_args()
    preload_openblas()

    lines = [prompt(s, suffix) for s in all_specs() for suffix in (False, True)]
    write_text_encoders(args.out, args.seed, lines)
    write_scheduler(args.out, SHIFT)

    pixels, _, _ = training_scenes(args.images)
    images = to_model(pixels)
    mx.random.seed(args.seed)
    model = Autoencoder(VAE)
    if args.init is not None:
        model.update(load_vae(args.init, mx.float32).parameters())
    if args.decoder_only:
        model.encoder.freeze()
    rng = np.random.default_rng(args.seed)
    side = images.shape[1] // VAE.factor

    def batch(step: int) -> tuple:
        x = mx.array(images[rng.choice(len(images), args.batch, replace=False)])
        return x, mx.random.normal((args.batch, side, side, VAE.latent_channels))

    fit(model, partial(vae_loss, model, kl_weight=args.kl_weight), batch, args.steps, args.lr, warmup=50, log_every=25)
    save_vae(args.out / "vae", half(model))

    shipped = load_vae(args.out / "vae", mx.float32)
    shift, std = latent_statistics(shipped, images[:2000])
    config = json.loads((args.out / "vae" / "config.json").read_text())
    config.update(shift_factor=shift, scaling_factor=1 / std)
    (args.out / "vae" / "config.json").write_text(json.dumps(config, indent=2))
    print(f"latents: shift_factor {shift:.4f}, scaling_factor {1 / std:.4f}")

    real, _, layouts = dataset(split()[1], min(200, args.images), DATA_SEED + 1)
    mean, _ = shipped.encode(mx.array(to_model(real)), tiled=False)
    recon = np.clip(np.array(shipped.decode(mean, tiled=False)) / 2 + 0.5, 0, 1)
    print(f"held-out reconstruction MSE {((recon - real / 255) ** 2).mean():.5f}; detector recovers "
          f"{np.mean([layout_matches(detect(r), lay) for r, lay in zip(recon, layouts)]):.3f} of the reconstructed "
          f"layouts ({np.mean([layout_matches(detect(r), lay) for r, lay in zip(real, layouts)]):.3f} of the drawn)")
    grid(np.concatenate([real[:16] / 255, recon[:16]]), 16).save(args.preview)


if __name__ == "__main__":
    main()
