"""The digit models' tiny autoencoder and linear preview map beside their VAE, on generated latents: mean absolute
difference of the decoded images, the held-out digit classifier's accuracy on each (benchmarks/quality.py's
scorer), and decode time.

    python benchmarks/tiny_decode.py [--model digits-flash] [--per-digit 10] [--out benchmarks/results]

Generates `per-digit` images of each digit (prompts cycling through the training templates, seeds 0...) with the
model's defaults, keeps the final latents (`output_type="latent"`) and decodes them with the VAE, the tiny
autoencoder (<model>/taesd) and the manifest's linear map (upscaled 8x, nearest). Times: best of 3 decodes of
the whole batch, float32. Writes tiny_decode.md; the last line is the decode time ratio VAE / tiny.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import best_time, preload_openblas  # noqa: E402
from benchmarks.quality import SEED, Scorer  # noqa: E402
from mlx_flash import load_pipeline  # noqa: E402
from mlx_flash.layout import read_manifest  # noqa: E402
from mlx_flash.preview import latent_preview, model_latent_rgb  # noqa: E402
from mlx_flash.taesd import MODEL_FOLDER, load_tiny_autoencoder  # noqa: E402
from training.digits_data import TEMPLATES, prompts, to_digits  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits-flash")
    parser.add_argument("--per-digit", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    preload_openblas()

    pipe = load_pipeline(args.model, dtype="float32")
    latents = mx.concatenate([  # "latent" gives diffusers' NCHW layout; ours is NHWC
        pipe.generate([prompts(d)[i % len(TEMPLATES)] for i in range(args.per_digit)],
                      seed=SEED + d * args.per_digit, output_type="latent", progress=False).transpose(0, 2, 3, 1)
        for d in range(10)])
    labels = np.repeat(np.arange(10), args.per_digit)
    vae = pipe.vae
    tiny = load_tiny_autoencoder(pipe.root / MODEL_FOLDER, mx.float32)
    factors = model_latent_rgb(read_manifest(pipe.root), vae.config)

    decoders = {
        "VAE": lambda z: vae.latents_to_image(z, tiled=False) / 2 + 0.5,
        "tiny autoencoder": lambda z: tiny.decode(z) / 2 + 0.5,
        "linear map": lambda z: latent_preview(z, factors, upscale=vae.config.factor),
    }
    score = Scorer()
    images, seconds = {}, {}
    for name, decode in decoders.items():
        images[name] = np.clip(np.array(decode(latents)), 0, 1)
        seconds[name] = best_time(lambda decode=decode: mx.eval(decode(latents)))

    lines = [f"{args.model}, {len(labels)} generated images ({args.per_digit} per digit, seeds {SEED}-"
             f"{SEED + len(labels) - 1}), {images['VAE'].shape[1]}x{images['VAE'].shape[2]}. Mean |image - VAE's| "
             "in [0, 1] units; accuracy: the held-out SVC on the intended digit; decode: the whole batch, float32, "
             "best of 3.", "",
             "| decoder | mean abs. difference to the VAE | accuracy | Frechet distance | decode (s) |",
             "|---|---|---|---|---|"]
    for name, image in images.items():
        accuracy, distance = score(to_digits(image), labels)
        difference = np.abs(image - images["VAE"]).mean()
        lines.append(f"| {name} | {difference:.4f} | {accuracy:.1%} | {distance:.1f} | {seconds[name]:.3f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tiny_decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"ratio: {seconds['VAE'] / seconds['tiny autoencoder']:.2f}")


if __name__ == "__main__":
    main()
