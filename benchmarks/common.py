"""Shared benchmark plumbing: OpenBLAS preloading on Linux (mlx_flash.blas), timing, one process per framework."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Callable

from mlx_flash.blas import OPENBLAS_PATHS
from mlx_flash.blas import ensure_openblas as preload_openblas  # noqa: F401  (the benchmarks' name)

REFERENCES = ("diffusers", "transformers", "torch", "peft")  # parts whose names start with these run PyTorch


def load_average() -> str:
    """The machine's load average over 1, 5 and 15 minutes, as "1.2 / 3.4 / 5.6"."""
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def best_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Best wall time of `fn()` in seconds over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def reference_env() -> dict[str, str]:
    """This environment for a PyTorch process: without a preloaded OpenBLAS (and its OPENBLAS_CORETYPE), which
    would replace the BLAS PyTorch's wheels bring (MKL on x86; 4x faster than Debian's OpenBLAS 0.3.21 on a CPU it
    does not recognise)."""
    env = dict(os.environ)
    env.pop("OPENBLAS_CORETYPE", None)
    kept = [lib for lib in env.pop("LD_PRELOAD", "").split() if lib not in OPENBLAS_PATHS]
    if kept:
        env["LD_PRELOAD"] = " ".join(kept)
    return env


def run_part(script: str, part: str, *args: str) -> dict:
    """Run `script --part PART ARGS` in a fresh process (so each framework has the machine's memory to
    itself) and return the JSON object it prints on its last line. Parts named after a PyTorch library
    (`REFERENCES`) run with PyTorch's own BLAS (`reference_env`)."""
    env = reference_env() if part.startswith(REFERENCES) else None
    out = subprocess.run(
        [sys.executable, script, "--part", part, *args], check=True, stdout=subprocess.PIPE, text=True, env=env
    ).stdout
    return json.loads(out.strip().splitlines()[-1])
