"""Time and peak memory of decoding one image with the full-size SD3 VAE (random weights, float32 unless told), MLX
against diffusers, tiled and untiled, as a markdown table. MLX's "tiled" is its memory-bounded mode: on the CPU in
float32 the whole image one layer at a time in bands of rows (exact, one pass), elsewhere exact tiles (four passes).

    python benchmarks/vae_decode.py [--size 1024] [--tile-size 64] [--tile-overlap 16] [--device cpu|gpu]
                                    [--dtype float32] [--modes untiled,tiled]

Each row runs in a fresh process. Memory columns:
- "peak RSS": peak resident memory of the process during the decode (Linux VmHWM, reset just before)
  minus the resident memory before it (model and latent already built): every allocation of either
  framework, comparable.
- "framework peak": mx.get_peak_memory() after mx.reset_peak_memory(): MLX's own buffers (on the CPU backend in
  half precision this includes the unfolded inputs of MLX's convolutions, 9x the input of a 3x3 conv; float32
  ones are matmuls here); on a GPU, also PyTorch's torch.cuda.max_memory_allocated() (on the CPU PyTorch has no
  such counter).
Times and peaks: one decode, after a warm-up decode of one tile's size, untiled (it compiles MLX's CPU functions
and GPU kernels, 2-3 s on the CPU at 256x256, and runs PyTorch's first-call set-up).
Diffusers' tiling uses our tile size and overlap (SD3's config would tile only above 1024x1024). Rows run
MLX and diffusers alternately, each with the machine's load average (1, 5, 15 min) after it; diffusers keeps
PyTorch's own BLAS (benchmarks.common.run_part). The last line is the ratio of MLX's time in the mode mlx-flash
picks by default at this size (whole images up to 512x512 on the CPU, 1024x1024 on a GPU, the memory-bounded mode
above) to diffusers' untiled time; the line before it, MLX's memory-bounded mode against diffusers' untiled time.
On Linux the script re-executes itself with OpenBLAS preloaded (MLX's bundled BLAS is ~30x slower).
MLX untiled in half precision is skipped on the CPU when its measured memory scaling (7.5 GiB at 512x512, growing
with the pixel count: MLX's CPU convolutions unfold their input; float32 ones are matmuls here) exceeds the memory
available.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from benchmarks.common import load_average, preload_openblas, run_part  # noqa: E402
from mlx_flash.memory import CPU_VAE_BYTES_PER_PIXEL  # noqa: E402
from mlx_flash.vae import VAEConfig  # noqa: E402

GiB = 2**30


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def start_rss() -> int:
    """Reset the process's peak resident memory (Linux: /proc/self/clear_refs) and return the current one."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def peak_rss() -> int:
    return _status("VmHWM")


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 2**62


def run_mlx(size: int, tiled: bool, tile_size: int, tile_overlap: int, device: str, dtype: str) -> dict:
    import mlx.core as mx

    from mlx_flash.vae import Autoencoder, VAEConfig

    mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
    mx.random.seed(0)
    vae = Autoencoder(VAEConfig(tile_size=tile_size, tile_overlap=tile_overlap))
    vae.set_dtype(getattr(mx, dtype))
    z = mx.random.normal((1, size // 8, size // 8, 16)).astype(getattr(mx, dtype))
    mx.eval(vae.parameters(), z)
    mx.eval(vae.decode(z[:, :tile_size, :tile_size], tiled=False))
    mx.clear_cache()
    mx.reset_peak_memory()
    rss, base = start_rss(), mx.get_active_memory()
    start = time.perf_counter()
    mx.eval(vae.decode(z, tiled=tiled))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rss": peak_rss() - rss, "peak": mx.get_peak_memory() - base}


def run_diffusers(size: int, tiled: bool, tile_size: int, tile_overlap: int, device: str, dtype: str) -> dict:
    import torch
    from diffusers import AutoencoderKL

    device = "cuda" if device == "gpu" else "cpu"
    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, sample_size=1024,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    ).eval().to(device, getattr(torch, dtype))
    if tiled:
        vae.enable_tiling()
        vae.tile_latent_min_size, vae.tile_sample_min_size = tile_size, tile_size * 8
        vae.tile_overlap_factor = tile_overlap / tile_size
    z = torch.randn(1, 16, size // 8, size // 8).to(device, getattr(torch, dtype))
    with torch.no_grad():
        vae.decode(z[:, :, :tile_size, :tile_size])  # smaller than a tile: untiled
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device == "cuda" else 0
    rss = start_rss()
    start = time.perf_counter()
    with torch.no_grad():
        vae.decode(z)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else None
    return {"seconds": seconds, "rss": peak_rss() - rss, "peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="image height and width in pixels (multiple of 8)")
    parser.add_argument("--tile-size", type=int, default=64, help="tile size in latent pixels")
    parser.add_argument("--tile-overlap", type=int, default=16, help="tile overlap in latent pixels")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="gpu: Metal/CUDA MLX and CUDA torch")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--modes", default="untiled,tiled", help="comma-separated: untiled, tiled (default both)")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tiling = (str(args.tile_size), str(args.tile_overlap))

    if args.part:
        framework, mode = args.part.split(":")
        run = run_mlx if framework == "mlx" else run_diffusers
        print(json.dumps(run(args.size, mode == "tiled", args.tile_size, args.tile_overlap, args.device, args.dtype)))
        return

    if args.device == "cpu":
        preload_openblas()
    import mlx.core as mx

    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    print(f"SD3 VAE decode, {args.size}x{args.size} image ({args.size // 8}x{args.size // 8}x16 latent), {args.dtype}, "
          f"random weights, MLX on {mx.default_device()}; tiles {args.tile_size * 8} px, "
          f"overlap {args.tile_overlap * 8} px\n")
    print("| framework | mode | time (s) | peak RSS (GiB) | framework peak (GiB) | load average |")
    print("|---|---|---|---|---|---|")
    seconds = {}
    for mode in args.modes.split(","):
        for framework in ("mlx", "diffusers"):  # interleaved: a shared machine's load changes over the run
            need, free = CPU_VAE_BYTES_PER_PIXEL * args.size**2, available_memory()
            unfolds = mx.default_device() == mx.cpu and args.dtype != "float32"  # MLX's own CPU convolutions
            if (framework, mode) == ("mlx", "untiled") and unfolds and need > 0.8 * free:
                print(f"| {framework} | {mode} | skipped: needs ~{need / GiB:.0f} GiB, {free / GiB:.0f} free | | | |")
                continue
            r = run_part(__file__, f"{framework}:{mode}", "--size", str(args.size), "--tile-size", tiling[0],
                         "--tile-overlap", tiling[1], "--device", args.device, "--dtype", args.dtype)
            seconds[framework, mode] = r["seconds"]
            peak = f"{r['peak'] / GiB:.2f}" if r["peak"] is not None else "-"
            print(f"| {framework} | {mode} | {r['seconds']:.2f} | {r['rss'] / GiB:.2f} | {peak} | {load_average()} |",
                  flush=True)
    latent = args.size // 8
    tiles = VAEConfig(tile_size=args.tile_size, tile_overlap=args.tile_overlap).tiles(latent, latent)
    default = "tiled" if tiles else "untiled"
    if ("mlx", "tiled") in seconds and ("diffusers", "untiled") in seconds:
        print(f"\nMLX tiled against diffusers untiled: {seconds['mlx', 'tiled'] / seconds['diffusers', 'untiled']:.2f}")
    print(f"\nMLX {default} (mlx-flash's default at this size) against diffusers untiled:")
    print(f"ratio: {seconds['mlx', default] / seconds['diffusers', 'untiled']:.2f}")


if __name__ == "__main__":
    main()
