"""The `mlx-flash` command: `generate` images, print an image's generation `info`, `convert` a checkpoint,
`train` a LoRA or a fine-tuned model."""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
from pathlib import Path

from .version import __version__

DEFAULT_MODEL = "sd3.5-medium"
INTERRUPTED = 130  # the shell's exit status for a run stopped by Ctrl-C


def _add_generate_arguments(gen: argparse.ArgumentParser) -> None:
    # Settings default to None ("not given"): the model's defaults, or with --from the image's settings, apply.
    gen.add_argument("prompt_text", nargs="?", metavar="PROMPT", help="the prompt (or use --prompt)")
    gen.add_argument("--prompt", help="the prompt")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--model", default=None,
                     help=f"preset name, Hugging Face repo id or local model folder (default {DEFAULT_MODEL})")
    gen.add_argument("--base", default=None,
                     help="for a single-file --model: folder or repo id with its tokenizers (default: its preset's)")
    gen.add_argument("--from", dest="from_image", type=Path, default=None, metavar="IMAGE.png",
                     help="make an image mlx-flash made again from its metadata; other options override its settings")
    gen.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    gen.add_argument("--guidance", type=float, default=None, help="CFG scale; > 1 enables CFG (default: the model's)")
    gen.add_argument("--sampler", default=None, help="sampler (default: the model's, euler)")
    gen.add_argument("--shift", type=float, default=None, help="timestep shift (default: the model's scheduler's)")
    gen.add_argument("--sigmas", default=None, help="custom noise levels, one per step, comma separated")
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None, help="seed of the first image; image i uses seed + i")
    gen.add_argument("--num-images", type=int, default=None, help="images to make (default 1)")
    gen.add_argument("--image", type=Path, default=None, help="input image for img2img")
    gen.add_argument("--strength", type=float, default=None, help="img2img strength in (0, 1] (default 0.6)")
    gen.add_argument("--lora", action="append", default=None, metavar="PATH_OR_REPO_FILE[:SCALE]",
                     help="apply a LoRA (a .safetensors file, or ORG/REPO/FILE.safetensors on the hub) at SCALE "
                          "(default 1); repeatable")
    gen.add_argument("--quantize", type=int, choices=[2, 3, 4, 5, 6, 8], default=None, help="quantize the transformer")
    gen.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    gen.add_argument("--no-t5", action="store_const", const=True, default=None,
                     help="do not load T5-XXL (less memory, weaker text following)")
    gen.add_argument("--output", type=Path, default=None, help="PNG path (default: image.png, numbered if taken)")
    gen.add_argument("--force", action="store_true", help="overwrite existing output files")
    gen.add_argument("--verbose", action="store_true", help="print per-stage time and peak memory")


def build_parser() -> argparse.ArgumentParser:
    from .convert import cli as convert_cli
    from .training import cli as train_cli

    parser = argparse.ArgumentParser(prog="mlx-flash", description="Stable Diffusion 3.5 / SD3.5-Flash in MLX.")
    parser.add_argument("--version", action="version", version=f"mlx-flash {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_generate_arguments(commands.add_parser("generate", help="generate images from a prompt"))
    info_parser = commands.add_parser("info", help="print the generation settings stored in a PNG")
    info_parser.add_argument("image", type=Path)
    convert_cli.add_arguments(commands.add_parser(
        "convert", help="convert a checkpoint (hub repo, diffusers folder or single file) to an mlx-flash folder, "
                        "optionally quantized"))
    train_cli.add_arguments(commands.add_parser("train", help="fine-tune a model (LoRA or full) on captioned images"))
    from .training import distill_cli

    distill_cli.add_arguments(commands.add_parser("distill", help="distil a model into a 1-4 step student "
                                                                  "(SD3.5-Flash's method)"))
    return parser


# `--from`: the metadata fields that fill options the user did not give (option -> metadata key).
FROM_FIELDS = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "model": "model", "steps": "steps",
    "guidance": "guidance", "sampler": "sampler", "shift": "shift", "sigmas": "sigmas", "width": "width",
    "height": "height", "seed": "seed", "dtype": "dtype", "quantize": "quantize", "strength": "strength",
    "max_sequence_length": "max_sequence_length",
}


def _apply_from(args: argparse.Namespace) -> tuple[dict, dict]:
    """Fill the options not given on the command line from the settings an mlx-flash PNG records; return the
    generate() arguments only the metadata can carry, and the metadata."""
    from .image_io import read_metadata

    meta = read_metadata(args.from_image)
    if args.prompt_text is not None:
        args.prompt = args.prompt_text
    for option, key in FROM_FIELDS.items():
        if getattr(args, option, None) is None and meta.get(key) is not None:
            value = meta[key]
            setattr(args, option, ",".join(map(str, value)) if option == "sigmas" else value)
    if args.no_t5 is None and meta.get("t5") is False:
        args.no_t5 = True
    if meta.get("image_sha256") and args.image is None:
        raise ValueError(f"{args.from_image} was made by img2img from an image with sha256 "
                         f"{meta['image_sha256'][:12]}...; pass that image again with --image.")
    slg = meta.get("skip_layer_guidance")
    return {"skip_layer_guidance": False if slg is None else _slg(slg)}, meta


def _slg(fields: dict):
    from .presets import SkipLayerGuidance

    return SkipLayerGuidance(**{**fields, "layers": tuple(fields["layers"])})


def _sigmas(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--sigmas must be comma-separated numbers (e.g. 1.0,0.75,0.5,0.25), got {text!r}.") from None


def generate(args: argparse.Namespace) -> None:
    from .callbacks import Cancel, ProgressBar
    from .denoise import GenerationStopped
    from .image_io import next_free_path, save_png
    from .loading import load_pipeline

    extra, meta = _apply_from(args) if args.from_image is not None else ({}, {})
    prompt = args.prompt if args.prompt is not None else args.prompt_text
    if prompt is None:
        raise ValueError("no prompt given; pass it as an argument or with --prompt.")
    if args.prompt is not None and args.prompt_text is not None and args.from_image is None:
        raise ValueError("two prompts given; pass the prompt once, as an argument or with --prompt.")
    if args.image is not None and not args.image.is_file():
        raise FileNotFoundError(f"{args.image}: no such image file; check the --image path.")
    num_images = 1 if args.num_images is None else args.num_images
    if num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {num_images}.")
    explicit_output = args.output is not None
    output = args.output or Path("image.png")
    if explicit_output and output.suffix.lower() != ".png":
        raise ValueError(f"{output}: images are written as PNG; use a .png file name.")
    paths = [output] if num_images == 1 else [output.with_name(f"{output.stem}-{i}{output.suffix}")
                                              for i in range(num_images)]
    if explicit_output and not args.force:
        taken = [p for p in paths if p.exists()]
        if taken:
            raise FileExistsError(f"{taken[0]} already exists; pass --force to overwrite it or choose another --output.")

    from .lora import parse_lora_arg

    loras = ([parse_lora_arg(text) for text in args.lora] if args.lora is not None
             else [(entry["source"], entry["scale"]) for entry in meta.get("loras", [])])
    pipe = load_pipeline(args.model or DEFAULT_MODEL, dtype=args.dtype, quantize=args.quantize,
                         use_t5=not args.no_t5, base=args.base, loras=loras)
    same = ("model_revision", "model_fingerprint")
    if meta and any(meta.get(k) != pipe.identity.get(k) for k in same if k in meta or k in pipe.identity):
        logging.getLogger("mlx_flash").warning(
            "the model's files differ from those that made %s; its pixels will not be reproduced exactly.",
            args.from_image)
    request = pipe.request(
        prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
        height=args.height, width=args.width, seed=args.seed, image=args.image, strength=args.strength,
        num_images=num_images, sampler=args.sampler, shift=args.shift, sigmas=_sigmas(args.sigmas),
        max_sequence_length=getattr(args, "max_sequence_length", None), **extra,
    )
    cancel = Cancel()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.cancel())  # stop after the running step
    try:
        result = pipe.run(request, callbacks=[cancel, ProgressBar()])
    except GenerationStopped:
        raise KeyboardInterrupt from None
    finally:
        signal.signal(signal.SIGINT, previous)
    for i, (image, path) in enumerate(zip(result.images, paths)):
        if not explicit_output and not args.force:
            path = next_free_path(path)
        print(save_png(image, path, result.metadata(i), overwrite=args.force))
    if args.verbose:
        for stage in result.stages:
            print(f"{stage.name:15} {stage.seconds:8.2f} s  peak {stage.peak_memory / 1e9:6.2f} GB", file=sys.stderr)


def _json_ready(value):
    """NaN and infinities (which older files may hold) as strings, so that `info` prints valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    return [_json_ready(v) for v in value] if isinstance(value, list) else value


def info(args: argparse.Namespace) -> None:
    from .image_io import read_metadata

    print(json.dumps(_json_ready(read_metadata(args.image)), indent=2, ensure_ascii=False, allow_nan=False))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(message)s")
    try:
        if args.command == "convert":
            from .convert.cli import run as command
        elif args.command == "train":
            from .training.cli import run as command
        elif args.command == "distill":
            from .training.distill_cli import run as command
        else:
            command = {"generate": generate, "info": info}[args.command]
        command(args)
    except KeyboardInterrupt:
        print("mlx-flash: interrupted; nothing was written.", file=sys.stderr)
        return INTERRUPTED
    except (ValueError, OSError, KeyError, MemoryError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"mlx-flash: error: {message}", file=sys.stderr)
        return 1
    return 0
