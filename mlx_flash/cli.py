"""The `mlx-flash` command: `generate` images, print an image's generation `info`, `convert` a checkpoint."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

import convert.cli

from . import __version__
from .blas import ensure_openblas

DEFAULT_MODEL = "sd3.5-medium"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-flash", description="Stable Diffusion 3.5 / SD3.5-Flash in MLX.")
    parser.add_argument("--version", action="version", version=f"mlx-flash {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate images from a prompt")
    gen.add_argument("prompt_text", nargs="?", metavar="PROMPT", help="the prompt (or use --prompt)")
    gen.add_argument("--prompt", help="the prompt")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--model", default=DEFAULT_MODEL,
                     help=f"preset name, Hugging Face repo id or local model folder (default {DEFAULT_MODEL})")
    gen.add_argument("--base", default=None,
                     help="for a single-file --model: folder or repo id with its tokenizers (default: its preset's)")
    gen.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    gen.add_argument("--guidance", type=float, default=None, help="CFG scale; > 1 enables CFG (default: the model's)")
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None, help="seed of the first image; image i uses seed + i")
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--image", type=Path, default=None, help="input image for img2img")
    gen.add_argument("--strength", type=float, default=None, help="img2img strength in (0, 1] (default 0.6)")
    gen.add_argument("--quantize", type=int, choices=[2, 3, 4, 5, 6, 8], default=None, help="quantize the transformer")
    gen.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    gen.add_argument("--no-t5", action="store_true", help="do not load T5-XXL (less memory, weaker text following)")
    gen.add_argument("--output", type=Path, default=None, help="PNG path (default: image.png, numbered if taken)")
    gen.add_argument("--force", action="store_true", help="overwrite existing output files")
    gen.add_argument("--verbose", action="store_true", help="print per-stage time and peak memory")

    info = commands.add_parser("info", help="print the generation settings stored in a PNG")
    info.add_argument("image", type=Path)

    convert.cli.add_arguments(commands.add_parser(
        "convert", help="convert a checkpoint (hub repo, diffusers folder or single file) to an mlx-flash folder, "
                        "optionally quantized"))
    return parser


def generate(args: argparse.Namespace) -> None:
    from .image_io import next_free_path, save_png
    from .pipeline import load_pipeline

    prompt = args.prompt if args.prompt is not None else args.prompt_text
    if prompt is None:
        raise ValueError("no prompt given; pass it as an argument or with --prompt.")
    if args.prompt is not None and args.prompt_text is not None:
        raise ValueError("two prompts given; pass the prompt once, as an argument or with --prompt.")
    if args.image is not None and not args.image.is_file():
        raise FileNotFoundError(f"{args.image}: no such image file; check the --image path.")
    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}.")
    explicit_output = args.output is not None
    output = args.output or Path("image.png")
    if explicit_output and output.suffix.lower() != ".png":
        raise ValueError(f"{output}: images are written as PNG; use a .png file name.")
    paths = [output] if args.num_images == 1 else [output.with_name(f"{output.stem}-{i}{output.suffix}")
                                                  for i in range(args.num_images)]
    if explicit_output and not args.force:
        taken = [p for p in paths if p.exists()]
        if taken:
            raise FileExistsError(f"{taken[0]} already exists; pass --force to overwrite it or choose another --output.")
    seed = args.seed if args.seed is not None else int(np.random.default_rng().integers(0, 2**31 - args.num_images))

    pipe = load_pipeline(args.model, dtype=args.dtype, quantize=args.quantize, use_t5=not args.no_t5, base=args.base)
    steps, guidance, _ = pipe.defaults()
    images = pipe.generate(
        prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
        height=args.height, width=args.width, seed=seed, image=args.image, strength=args.strength,
        num_images=args.num_images,
    )
    for i, (image, path) in enumerate(zip(images, paths)):
        metadata = {
            "prompt": prompt, "negative_prompt": args.negative_prompt, "seed": seed + i,
            "steps": args.steps or steps, "guidance": args.guidance if args.guidance is not None else guidance,
            "model": args.model, "width": image.width, "height": image.height, "dtype": str(pipe.dtype),
            "quantize": args.quantize, "t5": not args.no_t5, "mlx_flash_version": __version__,
        }
        if args.image is not None:
            metadata.update(image=str(args.image), strength=args.strength if args.strength is not None else 0.6)
        if not explicit_output and not args.force:
            path = next_free_path(path)
        print(save_png(image, path, metadata, overwrite=args.force))
    if args.verbose:
        for stage in pipe.stages:
            print(f"{stage.name:15} {stage.seconds:8.2f} s  peak {stage.peak_memory / 1e9:6.2f} GB", file=sys.stderr)


def info(args: argparse.Namespace) -> None:
    from .image_io import read_metadata

    print(json.dumps(read_metadata(args.image), indent=2, ensure_ascii=False))


def main(argv: list[str] | None = None) -> int:
    """The command line `argv` (None: this process's, with OpenBLAS preloaded on Linux, see mlx_flash.blas)."""
    if argv is None:
        ensure_openblas()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(message)s")
    try:
        {"generate": generate, "info": info, "convert": convert.cli.run}[args.command](args)
    except (ValueError, OSError, KeyError, MemoryError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"mlx-flash: error: {message}", file=sys.stderr)
        return 1
    return 0
