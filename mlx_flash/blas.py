"""A fast BLAS for MLX's Linux CPU backend.

MLX's Linux CPU wheel bundles a reference BLAS; with a system OpenBLAS preloaded (LD_PRELOAD) float32 matmul
runs about 30x faster. A library cannot be preloaded after the process started, so `ensure_openblas`
re-executes the running command with it. OpenBLAS releases that do not know a newer CPU model (0.3.21 on Emerald
Rapids) fall back to their SSE3 kernels, 5x slower again; then the re-executed command also names the AVX2 or
AVX-512 kernels the CPU supports (OPENBLAS_CORETYPE)."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Debian / Ubuntu (libopenblas0-pthread, either architecture), then Fedora / Arch.
OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
CHECKED = "MLX_FLASH_BLAS_CHECKED"  # set once checked, so that re-executed and child processes do not check again
# OpenBLAS kernels older than AVX2: on a CPU with AVX2, one of these means OpenBLAS did not recognise the model.
PRE_AVX2_CORES = {"katmai", "coppermine", "northwood", "prescott", "banias", "atom", "core2", "penryn", "dunnington",
                  "nehalem", "sandybridge", "opteron", "opteron_sse3", "barcelona", "bobcat", "bulldozer",
                  "piledriver", "steamroller", "excavator"}
AVX512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}  # what OpenBLAS's SkylakeX kernels use
HINT = ("mlx-flash: note: MLX's CPU backend is ~30x slower without OpenBLAS; install it "
        "(Debian/Ubuntu: apt-get install libopenblas0-pthread) and it is used automatically.")


def find_openblas() -> str | None:
    """Path of the system's OpenBLAS shared library, or None."""
    return next((path for path in OPENBLAS_PATHS if Path(path).exists()), None)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo), empty where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def kernels_for(core: str, flags: set[str]) -> str | None:
    """The OPENBLAS_CORETYPE for a CPU with `flags` on which OpenBLAS picked the kernels `core`: None where
    those are AVX2 or newer (or the CPU has no AVX2), else "SkylakeX" (AVX-512) or "Haswell" (AVX2 and FMA)."""
    if core.lower() not in PRE_AVX2_CORES:
        return None
    if AVX512 <= flags:
        return "SkylakeX"
    return "Haswell" if {"avx2", "fma"} <= flags else None


def core_type(library: str) -> str | None:
    """The OPENBLAS_CORETYPE that the OpenBLAS `library` needs on this CPU (`kernels_for`), None if unknown."""
    try:
        lib = ctypes.CDLL(library)
        lib.openblas_get_corename.restype = ctypes.c_char_p
        core = lib.openblas_get_corename().decode()
    except (OSError, AttributeError):
        return None
    return kernels_for(core, cpu_flags())


def ensure_openblas(restart: bool = True) -> None:
    """On Linux, re-execute this process's command line with OpenBLAS preloaded (and its kernels named where it
    does not recognise the CPU), unless it already is (or was checked); print one line on how to install it when
    it is missing and MLX runs on the CPU. `restart=False` (a process that runs no MLX itself, e.g. `mlx-flash launch`) only sets that environment for
    the processes it starts."""
    if sys.platform != "linux" or os.environ.get(CHECKED):
        return
    os.environ[CHECKED] = "1"
    library = find_openblas()
    if library is None:
        import mlx.core as mx

        if mx.default_device() == mx.cpu:
            print(HINT, file=sys.stderr)
        return
    preload = os.environ.get("LD_PRELOAD", "")
    env = {} if library in preload.split() else {"LD_PRELOAD": f"{library} {preload}".strip()}
    if "OPENBLAS_CORETYPE" not in os.environ and (core := core_type(library)):
        env["OPENBLAS_CORETYPE"] = core
    os.environ.update(env)
    if not env or not restart:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


@functools.cache
def loaded_openblas() -> ctypes.CDLL | None:
    """The OpenBLAS this process runs with (preloaded, so its symbols are global), or None."""
    process = ctypes.CDLL(None)
    return process if hasattr(process, "openblas_set_num_threads") else None


@contextmanager
def blas_threads(count: int) -> Iterator[None]:
    """Within the block, OpenBLAS multiplies with `count` threads (where this process runs with OpenBLAS)."""
    library = loaded_openblas()
    if library is None:
        yield
        return
    before = library.openblas_get_num_threads()
    library.openblas_set_num_threads(count)
    try:
        yield
    finally:
        library.openblas_set_num_threads(before)
