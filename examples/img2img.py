"""Image to image: python examples/img2img.py photo.png "the same scene as an oil painting" --strength 0.6"""

import argparse

import mlx_flash
from mlx_flash.image_io import next_free_path, save_png

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("image")
parser.add_argument("prompt")
parser.add_argument("--model", default="sd3.5-medium", help="preset name, hub repo id or local folder")
parser.add_argument("--strength", type=float, default=0.6, help="how much to change: 0 (nothing) to 1 (everything)")
parser.add_argument("--steps", type=int, default=None)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

pipe = mlx_flash.load_pipeline(args.model)
# The output takes the input's size (rounded down to a multiple of 16) unless height/width are given.
image = pipe.generate(args.prompt, image=args.image, strength=args.strength, num_inference_steps=args.steps,
                      seed=args.seed)[0]
metadata = {"prompt": args.prompt, "image": args.image, "strength": args.strength, "seed": args.seed}
print(f"saved {save_png(image, next_free_path('img2img.png'), metadata)}")
