"""Peak memory of converting a full-size SD3.5 Medium checkpoint (random float16 weights).

    python benchmarks/convert_memory.py [--workdir DIR] [--no-single-file]

Writes the full-size transformer and VAE (diffusers layout, and the Stability single-file layout) next to
the tiny test text encoders and tokenizers, streaming one tensor at a time, then converts each source in
its own process and reports that process's peak RSS (ru_maxrss) and MLX peak memory, against the largest
tensor. The converter streams tensor by tensor, so the peak should stay under 2 GB plus the largest tensor.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from benchmarks.common import run_part  # noqa: E402

GB = 1e9


def full_size_shapes() -> tuple[dict[str, dict[str, tuple[int, ...]]], dict[str, dict]]:
    """diffusers tensor names and shapes, and configs, of SD3.5 Medium's transformer and VAE (meta device:
    no memory)."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from mlx_flash.presets import SD35_MEDIUM

    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**SD35_MEDIUM.to_diffusers())
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
            scaling_factor=1.5305, shift_factor=0.0609, sample_size=1024)
    return {
        name: {k: tuple(v.shape) for k, v in model.state_dict().items()}
        for name, model in (("transformer", transformer), ("vae", vae))
    }, {"transformer": dict(transformer.config), "vae": dict(vae.config)}


def write_random(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A float16 .safetensors file of random-looking tensors (a random block, rolled and tiled: fast), each
    generated and written on its own."""
    import mlx.core as mx

    from mlx_flash.weights import write_safetensors

    block = (0.02 * mx.random.normal((1 << 20,), key=mx.random.key(0))).astype(mx.float16)
    tensors = {}
    for i, (key, shape) in enumerate(shapes.items()):
        n = math.prod(shape)
        tensors[key] = mx.tile(mx.roll(block, i), (-(-n // block.size),))[:n].reshape(shape)
    write_safetensors(path, list(tensors), tensors, path.name)


def make_sources(workdir: Path, single_file: bool) -> tuple[Path, Path | None, int]:
    """(diffusers folder, single file or None, bytes of the largest tensor)."""
    from tiny import make_tiny_pipeline

    folder = make_tiny_pipeline(workdir / "sd3.5-medium-random")
    shapes, configs = full_size_shapes()
    for name, tensors in shapes.items():
        weights = folder / name / "diffusion_pytorch_model.safetensors"
        write_random(weights, tensors)
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in configs[name].items() if not k.startswith("_")}
        (folder / name / "config.json").write_text(json.dumps(config, indent=1))
    largest = max(2 * math.prod(shape) for tensors in shapes.values() for shape in tensors.values())
    path = None
    if single_file:
        import torch
        from single_file_maker import to_single_file

        states = {name: {k: torch.empty(s, device="meta") for k, s in tensors.items()}
                  for name, tensors in shapes.items()}
        path = workdir / "sd3.5_medium_random.safetensors"
        write_random(path, {k: tuple(v.shape) for k, v in to_single_file(states).items()})
    return folder, path, largest


def part_make(workdir: Path, single_file: bool) -> None:
    """Child process: write the sources and print where they are as JSON."""
    folder, single, largest = make_sources(workdir, single_file)
    print(json.dumps({"folder": str(folder), "single": single and str(single), "largest": largest}))


def part_convert(args: list[str]) -> None:
    """Child process: run one conversion and print its peak memory as JSON. The parent process stays small,
    since a child's ru_maxrss starts from the RSS of the process it was forked from."""
    import mlx.core as mx

    from mlx_flash.convert.cli import add_arguments, run

    start = time.perf_counter()
    run(add_arguments(argparse.ArgumentParser()).parse_args(args))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    print(json.dumps({"seconds": time.perf_counter() - start, "rss": rss, "mlx_peak": mx.get_peak_memory()}))


def weight_bytes(folder: Path) -> int:
    """Bytes of the transformer's and the VAE's weight files in a model folder."""
    return sum(p.stat().st_size for name in ("transformer", "vae") for p in (folder / name).glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the checkpoints (default: /tmp)")
    parser.add_argument("--no-single-file", action="store_true", help="skip the single-file source")
    args, rest = parser.parse_known_args()
    if args.part == "convert":
        part_convert(rest)
        return
    if args.part == "make":
        part_make(args.workdir, not args.no_single_file)
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        start = time.perf_counter()
        made = run_part(__file__, "make", "--workdir", tmp, *(["--no-single-file"] if args.no_single_file else []))
        folder, single, largest = Path(made["folder"]), made["single"] and Path(made["single"]), made["largest"]
        print(f"wrote the random checkpoints in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        workdir = Path(tmp)
        cases = [("diffusers folder", folder, ["--dtype", "float16"]),
                 ("diffusers folder", folder, ["--dtype", "bfloat16", "-q", "--bits", "4"])]
        if single is not None:
            cases.append(("single file", single, ["--dtype", "float16", "--base", str(folder)]))
        print("| source | options | time | peak RSS | MLX peak | largest tensor | source size | output size |")
        print("|---|---|---|---|---|---|---|---|")
        for i, (kind, source, options) in enumerate(cases):
            out = workdir / f"out{i}"
            r = run_part(__file__, "convert", str(source), str(out), *options)
            size = weight_bytes(folder) if source == folder else source.stat().st_size
            label = " ".join(options).replace(str(folder), "FOLDER")
            print(f"| {kind} | `{label}` | {r['seconds']:.0f} s | "
                  f"{r['rss'] / GB:.2f} GB | {r['mlx_peak'] / GB:.2f} GB | {largest / GB:.2f} GB | {size / GB:.2f} GB "
                  f"| {weight_bytes(out) / GB:.2f} GB |", flush=True)


if __name__ == "__main__":
    main()
