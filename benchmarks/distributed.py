"""Images per second of a prompt-file job in one process and in two (`mlx-flash launch -n 2 --backend ring` on
this machine), each process pinned to its own core, against the ideal (twice the one-process rate).

    flock /tmp/bench.lock python benchmarks/distributed.py [--images 16] [--steps 8] [--model digits-flash]
        [--repeats 1] [--launcher mlx.launch]

`--launcher mlx.launch` starts the two with MLX's launcher as it is, whose I/O loop keeps more than a core busy
(see mlx_flash/launch.py). On Linux with autogroup scheduling (/proc/sys/kernel/sched_autogroup_enabled), other
sessions' jobs take an equal share of a core whatever their nice value; to measure as on a quiet machine, give
this run's session the priority (root): `flock /tmp/bench.lock setsid sh -c 'echo -20 > /proc/self/autogroup &&
exec python benchmarks/distributed.py'`.

Each run is a fresh `mlx-flash generate --prompt-file`. Two rates per run: the whole run's (model loading and
the launcher's start included, as a user sees it) and the steady state's, from the files' modification times
(images written after the first round over the time they took; a fixed start-up cost does not enter it). Also
printed: the cores each run kept busy (its processes' CPU time over its wall time: one process on a quiet machine
keeps ~1 busy, two ~2; less means other processes took the cores, or a rank waited). The last line is
`ratio: X`, two processes' steady-state rate over one's (ideal 2.0); the whole-run ratio is printed above it.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import load_average  # noqa: E402

WRAPPER = """#!/bin/sh
exec taskset -c "$MLX_RANK" {mlx_flash} "$@"
"""  # a rank: mlx-flash on the core of its rank


@dataclass(frozen=True)
class Run:
    """One job's figures: wall seconds, CPU seconds of all its processes, and the steady-state images/s."""

    wall: float
    cpu: float
    steady: float


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], cwd: Path, env: dict, outputs: list[Path], per_round: int) -> Run:
    """Run `command` (which writes `outputs`, `per_round` images a round) and measure it."""
    cpu, start = children_cpu(), time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, children_cpu() - cpu
    if result.returncode != 0 or "error" in result.stderr:
        sys.exit(f"benchmark run failed: {result.stderr.strip().splitlines()[-1:]}")
    written = sorted(path.stat().st_mtime_ns for path in outputs)
    steady = (len(written) - per_round) / ((written[-1] - written[per_round - 1]) / 1e9)
    return Run(wall, cpu, steady)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--model", default="digits-flash")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each; the best is shown")
    parser.add_argument("--launcher", choices=("mlx-flash", "mlx.launch"), default="mlx-flash",
                        help="what starts the two processes: mlx-flash launch, or MLX's launcher as it is")
    args = parser.parse_args()
    if args.images < 6:
        parser.error("--images must be at least 6 (the steady state needs rounds after the first)")
    mlx_flash = shutil.which("mlx-flash")
    load_before = load_average()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "job.txt").write_text("".join(f"the number {i % 10}\n" for i in range(args.images)))
        wrapper = folder / "ranks" / "mlx-flash"  # first on PATH: what `mlx-flash launch` starts on each rank
        wrapper.parent.mkdir()
        wrapper.write_text(WRAPPER.format(mlx_flash=mlx_flash))
        wrapper.chmod(0o755)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
               "PATH": f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}"}
        job = ["generate", "--model", args.model, "--prompt-file", "job.txt", "--steps", str(args.steps)]
        ranks = ["-n", "2", "--backend", "ring"]
        launchers = {1: ["taskset", "-c", "0", mlx_flash],
                     2: [mlx_flash, "launch", *ranks] if args.launcher == "mlx-flash"
                     else ["mlx.launch", *ranks, str(wrapper)]}
        runs: dict[int, list[Run]] = {1: [], 2: []}
        for _ in range(args.repeats):
            for size, launcher in launchers.items():
                out = folder / f"out{size}"
                shutil.rmtree(out, ignore_errors=True)
                outputs = [out / f"{i}.png" for i in range(args.images)]
                runs[size].append(timed([*launcher, *job, "--output", f"{out.name}/{{index}}.png"], folder, env,
                                        outputs, size))
        same = all((folder / "out1" / f"{i}.png").read_bytes() == (folder / "out2" / f"{i}.png").read_bytes()
                   for i in range(args.images))
    one = min(runs[1], key=lambda r: r.wall), max(runs[1], key=lambda r: r.steady)
    two = min(runs[2], key=lambda r: r.wall), max(runs[2], key=lambda r: r.steady)
    print(f"{args.images} images of {args.model}, {args.steps} steps, one core per process, best of "
          f"{args.repeats} (load average {load_before} before, {load_average()} after):")
    for name, (whole, steady), ideal in (("1 process:  ", one, ""),
                                         ("2 processes:", two, f"  (ideal {2 * one[1].steady:5.2f})")):
        print(f"  {name} whole run {whole.wall:6.1f} s {args.images / whole.wall:6.2f} images/s, "
              f"{whole.cpu / whole.wall:4.2f} cores busy; steady state {steady.steady:6.2f} images/s{ideal}")
    print(f"  files identical to the one-process run: {same}")
    print(f"  whole-run ratio (start-up included): {one[0].wall / two[0].wall:.2f}")
    print(f"ratio: {two[1].steady / one[1].steady:.2f}")


if __name__ == "__main__":
    main()
