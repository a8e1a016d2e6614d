"""Encode time of one prompt by the three SD3 text encoders (random weights, float32): MLX against transformers,
each encoder and framework in its own process, as a markdown table.

    python benchmarks/text_encoders.py [--device cpu|gpu] [--t5-layers N] [--repeats 3] [--quantize 4]

CLIP-L and CLIP-G encode 77 tokens, T5-XXL 256. T5-XXL has 24 layers (18.5 GB in float32); by default it runs
with as many as fit in 60% of the available memory, said in its row. On Linux the script re-executes itself with
OpenBLAS preloaded (mlx_flash.blas). The last line is the ratio of the summed MLX times to the summed
transformers times. Each row ends with the machine's load average (1, 5, 15 min) after it; transformers keeps
PyTorch's own BLAS (benchmarks.common.run_part).

--quantize BITS compares MLX's T5-XXL with itself instead: quantized as `load_pipeline(..., quantize=BITS)` loads it,
against float32 at the same depth, each in its own process, with MLX's peak memory during the
encoding above the weights (on the CPU each quantized layer is dequantized just before its matmul, one at a time:
mlx_flash.quantization.layer_by_layer); the last line is the ratio of the quantized time to the float one.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import best_time, load_average, preload_openblas, run_part  # noqa: E402
from mlx_flash.clip import CLIP_G, CLIP_L  # noqa: E402
from mlx_flash.memory import largest_layer_bytes  # noqa: E402
from mlx_flash.t5 import T5_XXL, T5Encoder  # noqa: E402

TOKENS = {"clip_l": 77, "clip_g": 77, "t5": 256}
T5_LAYER_BYTES = 4 * (4 * 4096 * 4096 + 3 * 4096 * 10240)


def config(name: str, t5_layers: int):
    return {"clip_l": CLIP_L, "clip_g": CLIP_G, "t5": replace(T5_XXL, num_layers=t5_layers)}[name]


def mlx_part(name: str, t5_layers: int, device: str, repeats: int, quantize: int | None = None) -> dict:
    import mlx.core as mx

    from mlx_flash.clip import CLIPTextModel
    from mlx_flash.quantization import quantized

    mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
    mx.random.seed(0)
    model = (T5Encoder if name == "t5" else CLIPTextModel)(config(name, t5_layers))
    if quantize:
        quantized(model, quantize)
        for block in model.blocks:  # one block's float weights at a time while quantizing
            mx.eval(block.parameters())
    mx.eval(model.parameters())
    ids = mx.random.randint(0, 30000, (1, TOKENS[name]))
    mx.eval(ids)
    weights = mx.get_active_memory()
    mx.reset_peak_memory()
    seconds = best_time(lambda: mx.eval(model(ids)), repeats=repeats)
    return {"seconds": seconds, "weights": weights, "peak": mx.get_peak_memory()}


def transformers_part(name: str, t5_layers: int, device: str, repeats: int) -> dict:
    import torch
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    device = "cuda" if device == "gpu" else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    c = config(name, t5_layers)
    if name == "t5":
        cls, hf = T5EncoderModel, T5Config(**c.to_dict())
    else:
        cls, hf = CLIPTextModelWithProjection, CLIPTextConfig(**c.to_dict())
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(hf).eval()
    ids = torch.randint(0, 30000, (1, TOKENS[name]), device=device)
    with torch.inference_mode():
        return {"seconds": best_time(lambda: (model(ids), sync()), repeats=repeats)}


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 2**62


def quantized_t5(args, layers: int) -> None:
    """The --quantize comparison: MLX's quantized T5-XXL against its float one."""
    extra = ["--device", args.device, "--t5-layers", str(layers), "--repeats", str(args.repeats)]
    results = {label: run_part(__file__, part, *extra)
               for label, part in (("float32", "mlx:t5"), (f"{args.quantize}-bit", f"mlx:t5:{args.quantize}"))}
    print(f"T5-XXL ({layers} of 24 layers), one prompt of 256 tokens, MLX, {args.device}: float32 against "
          f"{args.quantize}-bit weights\n")
    print("| weights | encode (s) | weights (GB) | peak - weights (GB) |")
    print("|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['seconds']:.3f} | {r['weights'] / 1e9:.2f} | {(r['peak'] - r['weights']) / 1e9:.3f} |")
    print(f"largest layer's float32 weight: {largest_layer_bytes(T5Encoder(T5_XXL)) / 1e9:.3f} GB")
    print(f"ratio: {results[f'{args.quantize}-bit']['seconds'] / results['float32']['seconds']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="gpu: Metal/CUDA MLX, CUDA torch")
    parser.add_argument("--t5-layers", type=int, default=None, help="T5-XXL depth (default: what fits, at most 24)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quantize", type=int, choices=[2, 3, 4, 5, 6, 8], default=None,
                        help="compare T5-XXL quantized to this many bits with the float one (MLX)")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args()
    layers = args.t5_layers or max(1, min(T5_XXL.num_layers, int(0.6 * available_memory() / T5_LAYER_BYTES)))
    if args.part:
        framework, name, *bits = args.part.split(":")
        if framework == "mlx":
            print(json.dumps(mlx_part(name, layers, args.device, args.repeats, int(bits[0]) if bits else None)))
        else:
            print(json.dumps(transformers_part(name, layers, args.device, args.repeats)))
        return
    if args.device == "cpu":
        preload_openblas()
    if args.quantize:
        quantized_t5(args, layers)
        return
    print(f"SD3 text encoders, one prompt, float32, random weights, {args.device}\n")
    print("| encoder | tokens | MLX (s) | transformers (s) | ratio | load average |")
    print("|---|---|---|---|---|---|")
    totals = {"mlx": 0.0, "transformers": 0.0}
    for name in TOKENS:
        times = {}
        for framework in totals:
            extra = ["--device", args.device, "--t5-layers", str(layers), "--repeats", str(args.repeats)]
            times[framework] = run_part(__file__, f"{framework}:{name}", *extra)["seconds"]
            totals[framework] += times[framework]
        label = f"T5-XXL ({layers} of 24 layers)" if name == "t5" else {"clip_l": "CLIP-L", "clip_g": "CLIP-G"}[name]
        print(f"| {label} | {TOKENS[name]} | {times['mlx']:.3f} | {times['transformers']:.3f} | "
              f"{times['mlx'] / times['transformers']:.2f} | {load_average()} |", flush=True)
    print(f"ratio: {totals['mlx'] / totals['transformers']:.2f}")


if __name__ == "__main__":
    main()
