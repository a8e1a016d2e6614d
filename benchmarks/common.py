"""Shared benchmark plumbing: OpenBLAS preloading on Linux (mlx_flash.blas), timing, one process per framework."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Callable

from mlx_flash.blas import ensure_openblas as preload_openblas  # noqa: F401  (the benchmarks' name)


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


def run_part(script: str, part: str, *args: str) -> dict:
    """Run `script --part PART ARGS` in a fresh process (so each framework has the machine's memory to
    itself) and return the JSON object it prints on its last line."""
    out = subprocess.run(
        [sys.executable, script, "--part", part, *args], check=True, stdout=subprocess.PIPE, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])
