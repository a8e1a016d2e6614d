"""Images per second of a prompt-file job in one process and in two (`mlx.launch -n 2 --backend ring` on this
machine), each process pinned to one core, against the ideal (twice the one-process rate).

    python benchmarks/distributed.py [--images 16] [--steps 8] [--model digits-flash]

Each run is a fresh `mlx-flash generate --prompt-file` (model loading included, as a user sees it); the last
line is `ratio: X`, two processes' rate over one's (ideal 2.0).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WRAPPER = """#!/bin/sh
exec taskset -c "$MLX_RANK" {mlx_flash} "$@"
"""


def timed(command: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0 or "error" in result.stderr:
        sys.exit(f"benchmark run failed: {result.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--model", default="digits-flash")
    args = parser.parse_args()
    mlx_flash = shutil.which("mlx-flash")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "job.txt").write_text("".join(f"the number {i % 10}\n" for i in range(args.images)))
        wrapper = folder / "pinned-mlx-flash"
        wrapper.write_text(WRAPPER.format(mlx_flash=mlx_flash))
        wrapper.chmod(0o755)
        job = ["generate", "--model", args.model, "--prompt-file", "job.txt", "--steps", str(args.steps)]
        one = timed(["taskset", "-c", "0", mlx_flash, *job, "--output", "one/{index}.png"], folder, env)
        two = timed(["mlx.launch", "-n", "2", "--backend", "ring", str(wrapper), *job, "--output", "two/{index}.png"],
                    folder, env)
        same = all((folder / "one" / f"{i}.png").read_bytes() == (folder / "two" / f"{i}.png").read_bytes()
                   for i in range(args.images))
    load = os.getloadavg()[0]
    print(f"{args.images} images of {args.model}, {args.steps} steps, one core per process (load {load:.1f}):")
    print(f"  1 process:   {one:6.1f} s  {args.images / one:5.2f} images/s")
    print(f"  2 processes: {two:6.1f} s  {args.images / two:5.2f} images/s  (ideal {2 * args.images / one:5.2f})")
    print(f"  files identical to the one-process run: {same}")
    print(f"ratio: {one / two:.2f}")


if __name__ == "__main__":
    main()
