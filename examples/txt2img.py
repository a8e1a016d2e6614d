"""Text to image: python examples/txt2img.py "a lighthouse at dusk" --model sd3.5-large-turbo"""

import argparse

import mlx_flash
from mlx_flash.image_io import next_free_path, save_png

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("prompt")
parser.add_argument("--model", default="sd3.5-medium", help="preset name, hub repo id or local folder")
parser.add_argument("--steps", type=int, default=None)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--size", type=int, default=1024)
parser.add_argument("--quantize", type=int, default=None, help="e.g. 4 to quantize the transformer")
parser.add_argument("--no-t5", action="store_true")
args = parser.parse_args()

pipe = mlx_flash.load_pipeline(args.model, quantize=args.quantize, use_t5=not args.no_t5)
image = pipe.generate(args.prompt, num_inference_steps=args.steps, seed=args.seed, height=args.size, width=args.size)[0]
path = save_png(image, next_free_path("txt2img.png"), {"prompt": args.prompt, "seed": args.seed, "model": args.model})
print(f"saved {path}")
for stage in pipe.stages:
    print(f"  {stage.name:14} {stage.seconds:7.1f} s   peak {stage.peak_memory / 1e9:5.2f} GB")
