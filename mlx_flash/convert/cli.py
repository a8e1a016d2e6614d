"""Command line of the converter: `mlx-flash convert SOURCE OUTPUT [options]` and `python -m convert`."""

from __future__ import annotations

import argparse
import sys
import time

from ..quantization import BITS, GROUP_SIZES, POLICIES

# Per-component options -> the component folders they set.
COMPONENT_BITS = {
    "transformer_bits": ("transformer",),
    "t5_bits": ("text_encoder_3",),
    "clip_bits": ("text_encoder", "text_encoder_2"),
    "vae_bits": ("vae",),
}
DEFAULT_BITS = 4


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the converter's arguments to `parser`."""
    parser.add_argument("source", help="hub repo id, diffusers-layout folder, or .safetensors single-file checkpoint")
    parser.add_argument("output", help="the mlx-flash model folder to write")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                        help="precision of the weights (of the scales, when quantized); default bfloat16: the "
                             "range of float32 (SD3.5 Large overflows float16) and lossless from bf16 checkpoints")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize the transformer and T5 to --bits")
    parser.add_argument("--bits", type=int, choices=BITS, default=None, help=f"bits for -q (default {DEFAULT_BITS})")
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=64,
                        help="weights per scale (default 64)")
    parser.add_argument("--policy", choices=POLICIES, default="mixed",
                        help="mixed (default): adaLN modulations, embedders and proj_out at 8 bits; "
                             "plain: all at --bits")
    for option, components in COMPONENT_BITS.items():
        parser.add_argument(f"--{option.replace('_', '-')}", type=int, choices=(0, *BITS), default=None,
                            help=f"bits for {' and '.join(components)} (0: not quantized)")
    parser.add_argument("--no-t5", action="store_true", help="leave out T5-XXL (and do not download it)")
    parser.add_argument("--revision", default=None, help="branch, tag or commit of a hub SOURCE")
    parser.add_argument("--base", default=None,
                        help="diffusers repo or folder supplying what a single file lacks (tokenizers, scheduler, "
                             "text encoders)")
    parser.add_argument("--clip-l", default=None, help="CLIP-L text encoder file (clip_l.safetensors)")
    parser.add_argument("--clip-g", default=None, help="CLIP-G text encoder file (clip_g.safetensors)")
    parser.add_argument("--t5xxl", default=None, help="T5-XXL text encoder file (t5xxl_fp16.safetensors)")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH_OR_REPO_FILE[:SCALE]",
                        help="fuse a LoRA into the weights (before any quantization); repeatable")
    parser.add_argument("--upload-repo", default=None, metavar="ORG/NAME", help="push the result to this hub repo")
    parser.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    return parser


def component_bits(args: argparse.Namespace) -> dict[str, int]:
    """Bits per component folder: -q sets the transformer and T5 to --bits; per-component options override."""
    if args.bits is not None and not args.quantize:
        raise ValueError("--bits applies to -q/--quantize; add -q, or set bits per component "
                         "(e.g. --transformer-bits).")
    default = (args.bits or DEFAULT_BITS) if args.quantize else 0
    bits = {"transformer": default, "text_encoder_3": default}
    for option, components in COMPONENT_BITS.items():
        if getattr(args, option) is not None:
            bits.update(dict.fromkeys(components, getattr(args, option)))
    return {name: b for name, b in bits.items() if b}


def run(args: argparse.Namespace) -> None:
    """Run a conversion as parsed by `add_arguments`."""
    from ..lora import parse_scaled_arg
    from .converter import convert

    encoder_files = {kind: getattr(args, kind) for kind in ("clip_l", "clip_g", "t5xxl") if getattr(args, kind)}
    start = time.perf_counter()
    output = convert(
        args.source, args.output, dtype=args.dtype, bits=component_bits(args), group_size=args.group_size,
        policy=args.policy, use_t5=not args.no_t5, revision=args.revision, base=args.base,
        encoder_files=encoder_files, upload_repo=args.upload_repo, force=args.force,
        loras=[parse_scaled_arg(text) for text in args.lora],
    )
    uploaded = f", uploaded to {args.upload_repo}" if args.upload_repo else ""
    print(f"{output} ({time.perf_counter() - start:.0f} s){uploaded}")


def main(argv: list[str] | None = None) -> int:
    """`python -m convert`: the same as `mlx-flash convert`."""
    from ..cli import main as cli_main

    return cli_main(["convert", *(sys.argv[1:] if argv is None else argv)])
