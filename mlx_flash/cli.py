"""The `mlx-flash` command: `generate` images, print an image's generation `info`, list the preset `models`,
`serve` images over HTTP, `convert` a checkpoint, `train` a LoRA or a fine-tuned model."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .blas import ensure_openblas
from .files import first_line
from .version import __version__

if TYPE_CHECKING:
    from .pipeline import Pipeline

DEFAULT_MODEL = "sd3.5-medium"
INTERRUPTED = 130  # the shell's exit status for a run stopped by Ctrl-C
BROKEN_PIPE = 141  # the status of a command killed by SIGPIPE, as other command line tools report it
TEXT_ARGUMENTS = {"prompt_text": "the prompt", "prompt": "--prompt", "negative_prompt": "--negative-prompt"}
DEBUG = "MLX_FLASH_DEBUG"  # set to 1 to get the traceback of an unexpected error


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line pointing to `--help` (not the whole usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`.\n")


def _add_generate_arguments(gen: argparse.ArgumentParser) -> None:
    from .samplers import SAMPLERS

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
    gen.add_argument("--sampler", default=None,
                     help=f"one of {', '.join(SAMPLERS)} (default: the model's; `mlx-flash models` lists them)")
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
    gen.add_argument("--controlnet", action="append", default=None, metavar="PATH_OR_REPO[:SCALE]",
                     help="an SD3 / SD3.5 ControlNet (folder, .safetensors file or repo id) and its conditioning "
                          "scale (default 1); repeat for several")
    gen.add_argument("--control-image", action="append", type=Path, default=None,
                     help="the ControlNets' control image: one for all, or repeated, one per --controlnet")
    gen.add_argument("--control-type", choices=["canny", "blur", "none"], default=None,
                     help="compute Canny edges or a Gaussian blur of the control image first (default none)")
    gen.add_argument("--control-start", default=None, help="fraction of the steps each ControlNet starts at "
                                                           "(default 0; comma separated, one per ControlNet)")
    gen.add_argument("--control-end", default=None, help="fraction of the steps each ControlNet ends at (default 1)")
    gen.add_argument("--mask", type=Path, default=None, help="inpainting mask for --image (white repaints)")
    gen.add_argument("--mask-blur", type=float, default=None, help="blur the mask by this radius in pixels first")
    gen.add_argument("--padding-mask-crop", type=int, default=None,
                     help="inpaint only a crop around the mask, grown by this many pixels, and paste it back")
    gen.add_argument("--outpaint", default=None, metavar="LEFT,TOP,RIGHT,BOTTOM",
                     help="pad --image by these pixel counts and paint the new border (strength default 1)")
    gen.add_argument("--quantize", type=int, choices=[2, 3, 4, 5, 6, 8], default=None, help="quantize the transformer")
    gen.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    gen.add_argument("--no-t5", action="store_const", const=True, default=None,
                     help="do not load T5-XXL (less memory, weaker text following)")
    gen.add_argument("--prompt-file", type=Path, default=None, metavar="FILE",
                     help="a job: one prompt a line, or JSON Lines with per-line settings (prompt, negative_prompt, "
                          "seed, steps, guidance, size, sampler, shift, num_images); runs data-parallel under mlx.launch")
    gen.add_argument("--resume", action="store_true",
                     help="with --prompt-file: skip images whose file exists with the same settings")
    gen.add_argument("--output", type=Path, default=None,
                     help="PNG path (default: image.png, numbered if taken); with --prompt-file a pattern with the "
                          "fields {index}, {seed}, {line}, {n}, {prompt} (default {index:05d}-{seed}.png)")
    gen.add_argument("--force", action="store_true", help="overwrite existing output files")
    gen.add_argument("--vae", choices=["full", "tiny"], default=None,
                     help="decoder of the final image: full (the VAE, default) or tiny (the tiny autoencoder: fast and "
                          "small, lower quality)")
    gen.add_argument("--preview", type=Path, default=None, metavar="DIR",
                     help="write the clean-image estimate of every step into DIR (tiny autoencoder, else a linear map)")
    gen.add_argument("--preview-every", type=int, default=1, metavar="K", help="with --preview: every K-th step")
    gen.add_argument("--verbose", action="store_true", help="print per-stage time and peak memory")


def _add_serve_arguments(srv: argparse.ArgumentParser) -> None:
    srv.add_argument("--model", action="append", default=None,
                     help=f"a model to serve (repeat for several; the first is the default; default {DEFAULT_MODEL})")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but "
                                                     "/health and the page (default: the MLX_FLASH_API_KEY variable)")
    srv.add_argument("--max-queue", type=int, default=8, help="jobs waiting behind the running one; more get 429")
    srv.add_argument("--preview-every", type=int, default=1,
                     help="send a job's preview every N steps (default 1; 0: none)")
    srv.add_argument("--max-body-mb", type=float, default=16, help="largest request body (default 16 MiB)")
    srv.add_argument("--allowed-origins", default="", help="comma-separated origins allowed by CORS (default: none)")
    srv.add_argument("--quantize", type=int, choices=[2, 3, 4, 5, 6, 8], default=None, help="quantize the transformer")
    srv.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    srv.add_argument("--no-t5", action="store_true", help="do not load T5-XXL")
    srv.add_argument("--lora", action="append", default=None, metavar="PATH_OR_REPO_FILE[:SCALE]",
                     help="load every served model with this LoRA at SCALE (default 1); requests select and rescale "
                          "LoRAs by file name in their 'loras' field; repeatable")
    srv.add_argument("--verbose", action="store_true", help="log every request")


def build_parser() -> argparse.ArgumentParser:
    from .convert import cli as convert_cli
    from .training import cli as train_cli

    parser = Parser(prog="mlx-flash", description="Stable Diffusion 3.5 / SD3.5-Flash in MLX.")
    parser.add_argument("--version", action="version", version=f"mlx-flash {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_generate_arguments(commands.add_parser("generate", help="generate images from a prompt"))
    info_parser = commands.add_parser("info", help="print the generation settings stored in a PNG")
    info_parser.add_argument("image", type=Path)
    commands.add_parser("models", help="list the presets: architecture, weights, default sampling, licence")
    _add_serve_arguments(commands.add_parser(
        "serve", help="serve OpenAI's Images API, AUTOMATIC1111's API and a web page"))
    convert_cli.add_arguments(commands.add_parser(
        "convert", help="convert a checkpoint (hub repo, diffusers folder or single file) to an mlx-flash folder, "
                        "optionally quantized"))
    train_cli.add_arguments(commands.add_parser("train", help="fine-tune a model (LoRA or full) on captioned images"))
    from .training import distill_cli

    distill_cli.add_arguments(commands.add_parser("distill", help="distil a model into a 1-4 step student "
                                                                  "(SD3.5-Flash's method)"))
    commands.add_parser("launch", help="mlx-flash launch [mlx.launch options] COMMAND ...: run a command on every "
                                       "rank of an mlx.launch job, exiting non-zero when a rank fails")
    return parser


# `--from`: the metadata fields that fill options the user did not give (option -> metadata key).
FROM_FIELDS = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "model": "model", "steps": "steps",
    "guidance": "guidance", "sampler": "sampler", "shift": "shift", "sigmas": "sigmas", "width": "width",
    "height": "height", "seed": "seed", "dtype": "dtype", "quantize": "quantize", "strength": "strength",
    "max_sequence_length": "max_sequence_length", "vae": "vae", "control_type": "control_type", "control_start": "control_start",
    "control_end": "control_end", "mask_blur": "mask_blur", "padding_mask_crop": "padding_mask_crop",
    "outpaint": "outpaint",
}
LIST_OPTIONS = ("sigmas", "control_start", "control_end", "outpaint")  # comma separated on the command line


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
            setattr(args, option, ",".join(map(str, value)) if option in LIST_OPTIONS else value)
    if args.no_t5 is None and meta.get("t5") is False:
        args.no_t5 = True
    if args.controlnet is None and meta.get("controlnets"):
        args.controlnet = [f"{net['name']}:{net['scale']}" for net in meta["controlnets"]]
    for key, option, what in (("image_sha256", "image", "img2img from an image"),
                              ("control_sha256", "control_image", "ControlNets from control images"),
                              ("mask_sha256", "mask", "inpainting with a mask")):
        if meta.get(key) and getattr(args, option) is None:
            digest = meta[key] if isinstance(meta[key], str) else ", ".join(d[:12] for d in meta[key])
            raise ValueError(f"{args.from_image} was made by {what} (sha256 {digest[:40]}...); pass it again with "
                             f"--{option.replace('_', '-')}.")
    slg = meta.get("skip_layer_guidance")
    return {"skip_layer_guidance": False if slg is None else _slg(slg)}, meta


def _slg(fields: dict):
    from .presets import SkipLayerGuidance

    return SkipLayerGuidance(**{**fields, "layers": tuple(fields["layers"])})


def _load(args: argparse.Namespace, loras: list, controlnets: list = ()) -> Pipeline:
    """The model the generate options name, with `loras` and `controlnets` (a preset's own T5 choice unless
    --no-t5)."""
    from .loading import load_pipeline

    return load_pipeline(args.model or DEFAULT_MODEL, dtype=args.dtype, quantize=args.quantize,
                         use_t5=False if args.no_t5 else None, base=args.base, loras=loras, controlnets=controlnets)


def _numbers(text: str | None, option: str, example: str, kind: type = float) -> list | None:
    if text is None:
        return None
    try:
        return [kind(s) for s in str(text).split(",")]
    except ValueError:
        raise ValueError(f"--{option} must be comma-separated numbers (e.g. {example}), got {text!r}.") from None


def _sigmas(text: str | None) -> list[float] | None:
    return _numbers(text, "sigmas", "1.0,0.75,0.5,0.25")


def _scaled(texts: list[str], kind: str) -> list[tuple[str, float]]:
    """--lora / --controlnet SOURCE[:SCALE] options as (source, scale) pairs."""
    from .lora import parse_scaled_arg

    return [parse_scaled_arg(text, kind) for text in texts]


def _stop_on_ctrl_c(cancel) -> object:
    """Ctrl-C stops the run after the running step (the previous handler is returned)."""
    return signal.signal(signal.SIGINT, lambda *_: cancel.cancel())


def generate_job(args: argparse.Namespace) -> None:
    """`generate --prompt-file`: every image of the job, data-parallel over the ranks of an mlx.launch job."""
    from .batch import DEFAULT_PATTERN, expand, read_prompt_file, run_job
    from .callbacks import Cancel
    from .denoise import GenerationStopped
    from .image_io import check_writable

    if args.prompt is not None or args.prompt_text is not None or args.from_image is not None:
        raise ValueError("--prompt-file takes the prompts from the file; drop the prompt argument (and --from).")
    if args.image is not None:
        raise ValueError("--prompt-file does not take --image; run img2img images one at a time.")
    for option in ("controlnet", "control_image", "mask", "outpaint"):
        if getattr(args, option) is not None:
            raise ValueError(f"--prompt-file does not take --{option.replace('_', '-')}; run ControlNet, inpainting "
                             "and outpainting images one at a time.")
    lines = read_prompt_file(args.prompt_file)
    defaults = {"negative_prompt": args.negative_prompt, "steps": args.steps, "guidance": args.guidance,
                "width": args.width, "height": args.height, "sampler": args.sampler, "shift": args.shift,
                "num_images": args.num_images or 1}
    images = expand(lines, defaults, args.seed or 0, str(args.output or DEFAULT_PATTERN))
    check_writable({image.path.parent: image.path for image in images}.values())  # one per folder, before loading
    pipe = _load(args, _scaled(args.lora or [], "LoRA"))
    cancel = Cancel()
    previous = _stop_on_ctrl_c(cancel)
    try:
        written = run_job(pipe, images, source=args.prompt_file, resume=args.resume, force=args.force,
                          callbacks=[cancel])
    except GenerationStopped:
        raise KeyboardInterrupt from None
    finally:
        signal.signal(signal.SIGINT, previous)
    for path in written:
        print(path)


def _output_paths(output: Path | None, num_images: int, force: bool) -> list[Path]:
    """The files a generation writes (image.png, numbered when taken, unless --output names them), checked for
    being free and writable before anything loads."""
    from .image_io import check_writable

    path = output or Path("image.png")
    if output is not None and path.suffix.lower() != ".png":
        raise ValueError(f"{path}: images are written as PNG; use a .png file name.")
    paths = [path] if num_images == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(num_images)]
    if output is not None and not force:
        taken = [p for p in paths if p.exists()]
        if taken:
            raise FileExistsError(f"{taken[0]} already exists; pass --force to overwrite it or choose another --output.")
    check_writable(paths)
    return paths


def _preview_paths(folder: Path, force: bool) -> Path:
    """The --preview folder, checked: previews of an earlier run in it are only replaced with --force."""
    from .image_io import check_writable

    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"--preview {folder} is a file; pass a folder for the step previews.")
    if not force and folder.is_dir() and any(folder.glob("step-*.png")):
        raise FileExistsError(f"{folder} already holds step previews; pass --force to replace them or choose "
                              "another --preview folder.")
    check_writable([folder / "step-001.png"])
    return folder


def _save_previews(folder: Path, step: int, images, force: bool) -> None:
    from .image_io import numpy_to_pil, save_png

    for i, image in enumerate(numpy_to_pil(np.array(images))):
        name = f"step-{step:03d}.png" if len(images) == 1 else f"step-{step:03d}-{i}.png"
        save_png(image, folder / name, {"preview_step": step}, overwrite=force)


def generate(args: argparse.Namespace) -> None:
    from .callbacks import Cancel, Preview, ProgressBar
    from .denoise import GenerationStopped
    from .image_io import next_free_path, save_png

    if args.prompt_file is not None:
        return generate_job(args)
    if args.resume:
        raise ValueError("--resume applies to --prompt-file jobs; add --prompt-file, or drop --resume.")
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
    paths = _output_paths(args.output, num_images, args.force)
    preview_paths = _preview_paths(args.preview, args.force) if args.preview is not None else None

    for path in [*(args.control_image or ()), *([args.mask] if args.mask else [])]:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such image file; check the path.")
    outpaint = _numbers(args.outpaint, "outpaint", "0,0,256,0 (LEFT,TOP,RIGHT,BOTTOM pixels)", int)
    loras = (_scaled(args.lora, "LoRA") if args.lora is not None
             else [(entry["source"], entry["scale"]) for entry in meta.get("loras", [])])
    pipe = _load(args, loras, _scaled(args.controlnet or [], "ControlNet"))
    same = ("model_revision", "model_fingerprint")
    if meta and any(meta.get(k) != pipe.identity.get(k) for k in same if k in meta or k in pipe.identity):
        logging.getLogger("mlx_flash").warning(
            "the model's files differ from those that made %s; its pixels will not be reproduced exactly.",
            args.from_image)
    request = pipe.request(
        prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
        height=args.height, width=args.width, seed=args.seed, image=args.image, strength=args.strength,
        num_images=num_images, sampler=args.sampler, shift=args.shift, sigmas=_sigmas(args.sigmas),
        max_sequence_length=getattr(args, "max_sequence_length", None), vae=args.vae or "full",
        control_image=args.control_image, control_type=args.control_type,
        control_start=_numbers(args.control_start, "control-start", "0,0.5"),
        control_end=_numbers(args.control_end, "control-end", "1,0.8"), mask=args.mask, mask_blur=args.mask_blur,
        padding_mask_crop=args.padding_mask_crop, outpaint=outpaint, **extra,
    )
    cancel = Cancel()
    callbacks = [cancel, ProgressBar()]
    if preview_paths is not None:
        callbacks.append(Preview(lambda step, images: _save_previews(preview_paths, step, images, args.force),
                                 pipe.preview_decoder(), args.preview_every))
    previous = _stop_on_ctrl_c(cancel)
    try:
        result = pipe.run(request, callbacks=callbacks)
    except GenerationStopped:
        raise KeyboardInterrupt from None
    finally:
        signal.signal(signal.SIGINT, previous)
    for i, (image, path) in enumerate(zip(result.images, paths)):
        if args.output is None and not args.force:
            path = next_free_path(path)
        print(save_png(image, path, result.metadata(i), overwrite=args.force))
    if args.verbose:
        for stage in result.stages:
            print(f"{stage.name:15} {stage.seconds:8.2f} s  peak {stage.peak_memory / 1e9:6.2f} GB", file=sys.stderr)


def serve(args: argparse.Namespace) -> None:
    from .server import Limits, ModelOptions, serve

    if not args.max_body_mb > 0:
        raise ValueError(f"--max-body-mb must be > 0, got {args.max_body_mb}.")
    limits = Limits(api_key=args.api_key or os.environ.get("MLX_FLASH_API_KEY") or None,
                    allowed_origins=tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip()),
                    max_body=int(args.max_body_mb * 2**20))
    serve(args.model or [DEFAULT_MODEL], host=args.host, port=args.port, limits=limits, max_queue=args.max_queue,
          preview_every=args.preview_every,
          options=ModelOptions(dtype=args.dtype, quantize=args.quantize, use_t5=not args.no_t5,
                               loras=tuple(_scaled(args.lora or [], "LoRA"))))


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


def check_text(args: argparse.Namespace) -> None:
    """Raise ValueError for a text argument that is not valid UTF-8 (undecodable bytes reach Python as
    surrogates)."""
    for name, label in TEXT_ARGUMENTS.items():
        value = getattr(args, name, None)
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{label} is not valid UTF-8 text; type it again in a UTF-8 terminal or "
                                 "convert it with iconv.") from None


def _silence_stdout() -> None:
    """After a broken pipe (`mlx-flash info x.png | head -c1`): send what is left to /dev/null, so that the
    interpreter's final flush does not fail too."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def models(args: argparse.Namespace) -> None:
    from .presets import PRESETS

    for p in PRESETS.values():
        def mark(field: str, text: str) -> str:
            return f"{text} (UNVERIFIED)" if field in p.unverified else text

        weights = [mark("repo_id", p.repo_id or "weights not public: pass a local folder or file")]
        if p.lora is not None:
            weights.append(mark("lora", f"+ LoRA {p.lora.location} at {p.lora.scale:g}"))
        if p.transformer_repo is not None:
            weights.append(mark("transformer_repo", f"+ transformer {p.transformer_repo}"))
        if not p.use_t5:
            weights.append("(without T5)")
        sampling = [mark("sampler", p.sampler), f"{p.num_steps} steps", mark("guidance_scale", f"guidance "
                    f"{p.guidance_scale:g}"), mark("shift", f"shift {p.shift:g}")]
        if p.sigmas is not None:
            sampling.append(mark("sigmas", "sigmas " + ",".join(f"{s:g}" for s in p.sigmas)))
        if p.scales is not None:
            sampling.append(mark("scales", "scales " + ",".join(str(s) for s in p.scales)))
        if p.skip_layer_guidance is not None:
            slg = p.skip_layer_guidance
            sampling.append(f"skip-layer guidance {slg.scale:g} on layers {','.join(map(str, slg.layers))}")
        print(f"{p.name}\n  {p.architecture}: {' '.join(weights)}\n  {', '.join(sampling)}\n  licence: {p.licence}")
        if p.note:
            print(f"  note: {p.note}")


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (None: this process's, with OpenBLAS preloaded on Linux, see mlx_flash.blas);
    every failure is one line on stderr (exit 1; 2 for usage, 130 for Ctrl-C)."""
    line = sys.argv[1:] if argv is None else argv
    if argv is None:
        ensure_openblas(restart=line[:1] != ["launch"])  # launch runs no MLX: it sets the environment of its ranks
    try:
        if line[:1] == ["launch"]:  # its options are mlx.launch's: passed on, not parsed here
            from .launch import main as launch

            return launch(line[1:])
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                            format="%(message)s")
        check_text(args)
        if args.command == "convert":
            from .convert.cli import run as command
        elif args.command == "train":
            from .training.cli import run as command
        elif args.command == "distill":
            from .training.distill_cli import run as command
        else:
            command = {"generate": generate, "info": info, "models": models, "serve": serve}[args.command]
        command(args)
        sys.stdout.flush()
    except KeyboardInterrupt:
        print("mlx-flash: interrupted; nothing was written.", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return BROKEN_PIPE
    except (ValueError, OSError, KeyError, MemoryError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"mlx-flash: error: {message}", file=sys.stderr)
        return 1
    except Exception as err:
        if os.environ.get(DEBUG):
            raise
        print(f"mlx-flash: error: unexpected {type(err).__name__}: {first_line(err)} (a bug: please report it; "
              f"set {DEBUG}=1 for the traceback)", file=sys.stderr)
        return 1
    return 0
