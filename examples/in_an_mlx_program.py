"""mlx-flash inside another MLX program: the pipeline's parts used directly, with MLX arrays in and out.

Interpolates between two seeds' initial noise (spherical interpolation, computed with MLX) and renders the
in-between images with a few-step model, then tiles them into one strip with MLX ops.

    python examples/in_an_mlx_program.py "a koi pond, top view" --model sd3.5-large-turbo --frames 5
"""

import argparse

import mlx.core as mx
import numpy as np
from PIL import Image

import mlx_flash


def slerp(a: mx.array, b: mx.array, t: float) -> mx.array:
    """Spherical interpolation that keeps Gaussian noise at its norm."""
    cos = mx.sum(a * b) / (mx.linalg.norm(a) * mx.linalg.norm(b))
    angle = mx.arccos(mx.clip(cos, -1, 1))
    return (mx.sin((1 - t) * angle) * a + mx.sin(t * angle) * b) / mx.sin(angle)


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("prompt")
parser.add_argument("--model", default="sd3.5-large-turbo")
parser.add_argument("--frames", type=int, default=5)
parser.add_argument("--size", type=int, default=512)
args = parser.parse_args()

pipe = mlx_flash.load_pipeline(args.model)
latent = (1, 16, args.size // 8, args.size // 8)  # diffusers' NCHW layout
start, end = (mx.random.normal(latent, key=mx.random.key(seed)) for seed in (0, 1))
noise = mx.concatenate([slerp(start, end, t) for t in np.linspace(0, 1, args.frames)])

# One batch: the prompt is encoded once and every frame denoised together.
frames = pipe.generate(args.prompt, latents=noise, num_images=args.frames, height=args.size, width=args.size,
                       output_type="mlx")  # an MLX array (frames, H, W, 3) in [0, 1]
strip = mx.concatenate(list(frames), axis=1)  # (H, frames * W, 3)
Image.fromarray(np.array((strip * 255).round().astype(mx.uint8))).save("interpolation.png")
print("saved interpolation.png")
