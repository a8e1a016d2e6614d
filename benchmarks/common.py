"""Shared benchmark plumbing: OpenBLAS preloading on Linux, timing, one process per framework."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/libopenblas.so.0")


def preload_openblas() -> None:
    """Re-execute this script with OpenBLAS preloaded (REFERENCE.md, Linux CPU note) when it is installed.

    MLX's Linux CPU wheel bundles a slow reference BLAS; OpenBLAS makes float32 matmul ~30x faster."""
    if sys.platform == "linux" and OPENBLAS.exists() and str(OPENBLAS) not in os.environ.get("LD_PRELOAD", ""):
        env = {**os.environ, "LD_PRELOAD": f"{OPENBLAS} {os.environ.get('LD_PRELOAD', '')}".strip()}
        print(f"[re-executing with LD_PRELOAD={OPENBLAS}]", file=sys.stderr, flush=True)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


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
