"""MLX's CPU lanes (`mlx_flash.lanes`) against one lane, in the same process and alternating: the full-size SD3 VAE
decode (untiled) or one step of the full-size SD3.5 Medium transformer, random weights, float32.

    python benchmarks/lanes.py [--model vae|transformer] [--size 512] [--lanes 2] [--repeats 3]

Each run sets the lane count by replacing `Lanes.for_inference`; the first run of each setting is a warm-up. Prints
each run's time, the best of each setting, the largest difference between their outputs, and last the ratio of the
best time with `--lanes` lanes to the best with one. On Linux the script re-executes itself with OpenBLAS preloaded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from benchmarks.common import CONTEXT_TOKENS, load_average, preload_openblas  # noqa: E402


def decode_fn(size: int):
    import mlx.core as mx

    from mlx_flash.vae import Autoencoder, VAEConfig

    vae = Autoencoder(VAEConfig())
    z = mx.random.normal((1, size // 8, size // 8, 16))
    mx.eval(vae.parameters(), z)
    return lambda: vae.decode(z, tiled=False)


def step_fn(size: int):
    import mlx.core as mx

    from mlx_flash.mmdit import MMDiT
    from mlx_flash.presets import SD35_MEDIUM

    model = MMDiT(SD35_MEDIUM)
    h = size // 8
    inputs = (mx.random.normal((1, h, h, 16)), mx.full((1,), 500.0), mx.random.normal((1, CONTEXT_TOKENS, 4096)),
              mx.random.normal((1, 2048)))
    mx.eval(model.parameters(), inputs)
    return lambda: model(*inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["vae", "transformer"], default="vae")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--lanes", type=int, default=2, help="lanes to compare with one (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each setting (default 3)")
    args = parser.parse_args()
    preload_openblas()
    import mlx.core as mx

    from mlx_flash.lanes import Lanes

    mx.set_default_device(mx.cpu)
    mx.random.seed(0)
    run = (decode_fn if args.model == "vae" else step_fn)(args.size)
    print(f"{args.model}, {args.size}x{args.size}, float32, cpu: 1 lane against {args.lanes}, alternating\n")
    print("| run | lanes | time (s) | load average |")
    print("|---|---|---|---|")
    times, outputs = {1: [], args.lanes: []}, {}
    for i in range(args.repeats + 1):
        for count in times:
            Lanes.for_inference = classmethod(lambda cls, tokens, count=count: cls(min(count, tokens)))
            start = time.perf_counter()
            outputs[count] = run()
            mx.eval(outputs[count])
            seconds = time.perf_counter() - start
            if i:  # the first run of each setting compiles and warms the buffer cache
                times[count].append(seconds)
            print(f"| {i if i else 'warm-up'} | {count} | {seconds:.2f} | {load_average()} |", flush=True)
    best = {count: min(t) for count, t in times.items()}
    difference = mx.abs(outputs[1] - outputs[args.lanes]).max().item()
    print(f"\nbest: 1 lane {best[1]:.2f} s, {args.lanes} lanes {best[args.lanes]:.2f} s; "
          f"outputs differ by at most {difference:.2e}")
    print(f"ratio: {best[args.lanes] / best[1]:.2f}")


if __name__ == "__main__":
    main()
