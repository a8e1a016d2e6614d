"""One denoising step of the full-size SD3.5 Medium transformer (random weights), float32 on this machine:
MLX against diffusers in the same run, with the step's matmul throughput and the time outside matmuls.

    python benchmarks/mmdit_step.py [--size 512] [--batch 1] [--repeats 2] [--device cpu|gpu] [--dtype float32]
                                    [--quantize 4]

Each framework runs in its own process. On Linux the script re-executes itself with OpenBLAS preloaded
(REFERENCE.md, Linux CPU note). Matmul time is measured by running the step's matrix multiplications alone
(same shapes, same counts) in each framework; the rest of the step is softmax, activations, norms and copies.
A step's time is the sum of each block's best time over `--repeats` runs plus the best of the rest
(benchmarks.common.PieceClock: this machine's speed drops for a second or two at a time).

--quantize BITS compares MLX with itself instead: the step of the model quantized as `mlx-flash convert --quantize
BITS` makes it (4-bit mixed by default) against the float step, each in its own process, with MLX's peak memory
during the step beside that of the weights and of the largest layer's weight in full precision (on the CPU each
quantized layer is dequantized just before its matmul, see mlx_flash.quantization).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    CONTEXT_TOKENS, PieceClock, best_time, piece_time, preload_openblas, run_part, time_mlx_blocks, time_torch_blocks,
)
from mlx_flash.presets import SD35_MEDIUM  # noqa: E402


def image_tokens(size: int) -> int:
    """The transformer's image tokens for a `size` x `size` image: 8x VAE downsampling, then 2x2 patches."""
    return (size // 16) ** 2


def step_matmuls(size: int, batch: int, per_head: bool, layers: int = SD35_MEDIUM.num_layers) -> Counter:
    """(batch, M, K, N) -> count for every matrix multiplication of one step (conv patchify as a matmul) of SD3.5
    Medium with its first `layers` blocks; `per_head`: attention's products one head at a time, as
    mlx_flash.mmdit.attention computes them on the CPU."""
    c = SD35_MEDIUM
    d, heads, hd = c.hidden_size, c.num_attention_heads, c.attention_head_dim
    n, l = image_tokens(size), CONTEXT_TOKENS
    rows_x, rows_c = batch * n, batch * l
    mm: Counter = Counter()
    mm[(1, rows_x, c.in_channels * c.patch_size**2, d)] += 1
    mm[(1, rows_c, c.joint_attention_dim, d)] += 1
    mm[(1, batch, 256, d)] += 1
    mm[(1, batch, d, d)] += 2
    mm[(1, batch, c.pooled_projection_dim, d)] += 1
    for i in range(layers):
        last, dual = i == layers - 1, i in c.dual_attention_layers
        mm[(1, batch, d, (9 if dual else 6) * d)] += 1
        mm[(1, batch, d, (2 if last else 6) * d)] += 1
        mm[(1, rows_x, d, 3 * d)] += 1 + dual
        mm[(1, rows_c, d, 3 * d)] += 1
        groups, per_group = (heads, batch) if per_head else (1, batch * heads)
        mm[(per_group, n + l, hd, n + l)] += groups  # q k^T
        mm[(per_group, n + l, n + l, hd)] += groups  # p v
        if dual:
            mm[(per_group, n, hd, n)] += groups
            mm[(per_group, n, n, hd)] += groups
        mm[(1, rows_x, d, d)] += 1 + dual
        mm[(1, rows_x, d, 4 * d)] += 1
        mm[(1, rows_x, 4 * d, d)] += 1
        if not last:
            mm[(1, rows_c, d, d)] += 1
            mm[(1, rows_c, d, 4 * d)] += 1
            mm[(1, rows_c, 4 * d, d)] += 1
    mm[(1, batch, d, 2 * d)] += 1
    mm[(1, rows_x, d, c.patch_size**2 * c.out_channels)] += 1
    return mm


def flops(mm: Counter) -> float:
    return sum(2.0 * b * m * k * n * count for (b, m, k, n), count in mm.items())


def mlx_matmul_times(args, dtype) -> tuple[float, float]:
    """MLX's float matmul peak (FLOP/s) and the time of the step's matmuls alone (0 with --quantize)."""
    import mlx.core as mx

    a, b = (mx.random.normal((4096, 4096)).astype(dtype) for _ in range(2))
    mx.eval(a, b)
    peak = 2 * 4096**3 / best_time(lambda: mx.eval(a @ b), repeats=5)
    matmul_time = 0.0
    for (bt, m, k, n), count in step_matmuls(args.size, args.batch, per_head=args.device == "cpu").items():
        if args.quantize:
            break
        x, w = mx.random.normal((bt, m, k)).astype(dtype), mx.random.normal((bt, k, n)).astype(dtype)
        mx.eval(x, w)
        matmul_time += count * best_time(lambda: mx.eval(x @ w), repeats=3)
    return peak, matmul_time


def mlx_part(args) -> dict:
    import mlx.core as mx

    from mlx_flash.memory import largest_layer_bytes
    from mlx_flash.mmdit import MMDiT
    from mlx_flash.quantization import Quantization, quantize_model

    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    dtype = getattr(mx, args.dtype)
    mx.random.seed(0)
    peak, matmul_time = mlx_matmul_times(args, dtype)
    model = MMDiT(SD35_MEDIUM)
    model.set_dtype(dtype)
    if args.part == "mlx-quantized":
        quantize_model(model, Quantization(args.quantize))
    for block in model.transformer_blocks:  # one block's float weights at a time when quantizing
        mx.eval(block.parameters())
    mx.eval(model.parameters())
    base = mx.get_active_memory()
    h = args.size // 8
    inputs = (
        mx.random.normal((args.batch, h, h, 16)).astype(dtype), mx.full((args.batch,), 500.0),
        mx.random.normal((args.batch, CONTEXT_TOKENS, 4096)).astype(dtype), mx.random.normal((args.batch, 2048)).astype(dtype),
    )
    mx.eval(inputs)
    mx.reset_peak_memory()
    clock = PieceClock()
    time_mlx_blocks(model.transformer_blocks, clock)
    step = piece_time(lambda: mx.eval(model(*inputs)), clock, repeats=args.repeats)
    return {"step_s": step, "matmul_s": matmul_time, "peak_flops": peak, "weights": base,
            "peak": mx.get_peak_memory(), "largest_layer": largest_layer_bytes(MMDiT(SD35_MEDIUM))}


def torch_part(args) -> dict:
    import torch
    from diffusers import SD3Transformer2DModel

    device, dtype = ("cuda" if args.device == "gpu" else "cpu"), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    a, b = randn(4096, 4096), randn(4096, 4096)
    peak = 2 * 4096**3 / best_time(lambda: (a @ b, sync()), repeats=5)
    matmul_time = 0.0
    for (bt, m, k, n), count in step_matmuls(args.size, args.batch, per_head=False).items():
        x, w = randn(bt, m, k), randn(bt, k, n)
        matmul_time += count * best_time(lambda: (x @ w, sync()), repeats=3)
    with torch.device("meta"):
        model = SD3Transformer2DModel(**SD35_MEDIUM.to_diffusers())
    model = model.to_empty(device=device).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    h = args.size // 8
    inputs = dict(
        hidden_states=randn(args.batch, 16, h, h), timestep=torch.full((args.batch,), 500.0, device=device),
        encoder_hidden_states=randn(args.batch, CONTEXT_TOKENS, 4096), pooled_projections=randn(args.batch, 2048),
    )
    clock = PieceClock()
    time_torch_blocks(model.transformer_blocks, clock, sync)
    with torch.inference_mode():
        step = piece_time(lambda: (model(**inputs), sync()), clock, repeats=args.repeats)
    return {"step_s": step, "matmul_s": matmul_time, "peak_flops": peak, "threads": torch.get_num_threads()}


def quantized(args, extra: list[str]) -> None:
    """The --quantize comparison: MLX quantized step against MLX float step."""
    extra = [*extra, "--quantize", str(args.quantize)]
    results = {name: run_part(__file__, name, *extra) for name in ("mlx", "mlx-quantized")}
    print(f"SD3.5 Medium transformer, one step, {args.size}x{args.size}, batch {args.batch}, {args.device}: "
          f"{args.dtype} against {args.quantize}-bit mixed weights (MLX)")
    print(f"{'':14} {'step s':>8} {'weights GB':>11} {'step peak GB':>13} {'peak - weights GB':>18}")
    for name, r in results.items():
        print(f"{name:14} {r['step_s']:8.3f} {r['weights'] / 1e9:11.2f} {r['peak'] / 1e9:13.2f} "
              f"{(r['peak'] - r['weights']) / 1e9:18.2f}")
    float_step, quantized_step = results["mlx"], results["mlx-quantized"]
    excess = (quantized_step["peak"] - quantized_step["weights"]) - (float_step["peak"] - float_step["weights"])
    print(f"largest linear layer's float32 weight: {float_step['largest_layer'] / 1e9:.3f} GB; the quantized step's "
          f"peak above its weights exceeds the float step's by {excess / 1e9:.3f} GB")
    print(f"ratio: {quantized_step['step_s'] / float_step['step_s']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="gpu: Metal/CUDA MLX and CUDA torch")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--quantize", type=int, choices=[2, 3, 4, 5, 6, 8], default=None,
                        help="compare the step of the model quantized to this many bits with the float one (MLX)")
    parser.add_argument("--part", choices=["mlx", "mlx-quantized", "diffusers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        print(json.dumps((torch_part if args.part == "diffusers" else mlx_part)(args)))
        return
    if args.device == "cpu":
        preload_openblas()
    total = flops(step_matmuls(args.size, args.batch, per_head=False))
    extra = ["--size", str(args.size), "--batch", str(args.batch), "--repeats", str(args.repeats),
             "--device", args.device, "--dtype", args.dtype]
    if args.quantize:
        quantized(args, extra)
        return
    results = {name: run_part(__file__, name, *extra) for name in ("mlx", "diffusers")}
    print(f"SD3.5 Medium transformer, one step, {args.size}x{args.size}, batch {args.batch}, {args.dtype}, {args.device}, "
          f"{total / 1e12:.2f} TFLOP of matmuls")
    print(f"{'':10} {'step s':>8} {'matmul s':>9} {'GFLOP/s':>8} {'peak':>6} {'% peak':>7} {'other s':>8}")
    for name, r in results.items():
        achieved = total / r["matmul_s"]
        print(f"{name:10} {r['step_s']:8.3f} {r['matmul_s']:9.3f} {achieved / 1e9:8.0f} {r['peak_flops'] / 1e9:6.0f} "
              f"{100 * achieved / r['peak_flops']:6.0f}% {r['step_s'] - r['matmul_s']:8.3f}")
    print(f"ratio: {results['mlx']['step_s'] / results['diffusers']['step_s']:.2f}")


if __name__ == "__main__":
    main()
