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

CONTEXT_TOKENS = 77 + 256  # an SD3 prompt: CLIP tokens, then T5 tokens
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


class PieceClock:
    """Times a step piece by piece (its transformer blocks), for a shared machine whose speed drops for a second or
    two at a time: the step's estimate is each piece's best time over the runs plus the best time of the rest, so a
    burst of load must hit the same piece in every run to move it, where a whole step's best time moves whenever
    each run meets one burst somewhere. Attach it with `time_mlx_blocks` / `time_torch_blocks`, then `run` steps."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.pieces: list[float] = []
        self._start = 0.0
        self._depth = 0  # a piece timed inside another one is part of it

    def enter(self) -> None:
        self._depth += 1
        if self._depth == 1:
            self._start = self.clock()

    def exit(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.pieces.append(self.clock() - self._start)

    def run(self, step: Callable[[], object]) -> tuple[list[float], float]:
        """One `step()`: its pieces' times and its whole time."""
        self.pieces = []
        start = self.clock()
        step()
        return self.pieces, self.clock() - start


def best_of_pieces(runs: list[tuple[list[float], float]]) -> float:
    """The step time estimate from `PieceClock.run` results: the sum of each piece's best and the rest's best."""
    pieces = [min(times) for times in zip(*(p for p, _ in runs))]
    return sum(pieces) + min(total - sum(p) for p, total in runs)


def piece_time(step: Callable[[], object], clock: PieceClock, repeats: int = 3, warmup: int = 1) -> float:
    """`best_of_pieces` over `repeats` runs of `step()` after `warmup` runs."""
    for _ in range(warmup):
        clock.run(step)
    return best_of_pieces([clock.run(step) for _ in range(repeats)])


def time_mlx_blocks(blocks: list, clock: PieceClock, methods: tuple[str, ...] = ("__call__", "on_lanes")) -> None:
    """Each MLX block evaluates its outputs when called (through any of `methods` it has: a transformer block on
    token lanes runs `on_lanes`) and is timed by `clock` (its class swapped for a timed subclass; the arrays are
    untouched)."""
    import mlx.core as mx

    def timed_method(base: Callable) -> Callable:
        def method(self, *args, **kwargs):
            clock.enter()
            out = base(self, *args, **kwargs)
            mx.eval(out)
            clock.exit()
            return out
        return method

    timed: dict[type, type] = {}
    for block in blocks:
        cls = type(block)
        if cls not in timed:
            wrapped = {name: timed_method(getattr(cls, name)) for name in methods if hasattr(cls, name)}
            timed[cls] = type(cls.__name__, (cls,), wrapped)
        block.__class__ = timed[cls]


def time_torch_blocks(blocks, clock: PieceClock, sync: Callable[[], None]) -> None:
    """Each PyTorch block timed by `clock` through forward hooks (`sync` waits for the device)."""
    def before(module, args) -> None:
        sync()
        clock.enter()

    def after(module, args, out) -> None:
        sync()
        clock.exit()

    for block in blocks:
        block.register_forward_pre_hook(before)
        block.register_forward_hook(after)
