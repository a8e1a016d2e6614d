"""A fast BLAS for MLX's Linux CPU backend.

MLX's Linux CPU wheel bundles a reference BLAS; with a system OpenBLAS preloaded (LD_PRELOAD) float32 matmul
runs about 30x faster. A library cannot be preloaded after the process started, so `ensure_openblas`
re-executes the running command with it. OpenBLAS releases that do not know a newer CPU model (0.3.21 on Emerald
Rapids) fall back to their SSE3 kernels, 5x slower again; then the re-executed command also names the AVX2 or
AVX-512 kernels the CPU supports (OPENBLAS_CORETYPE). An OPENBLAS_CORETYPE set beforehand stands, with a one-line
note where it names kernels narrower than the CPU's (AVX2 Haswell ones on an AVX-512 AMD EPYC: 1.85x slower)."""

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
AVX512_CORES = {"skylakex", "cooperlake", "sapphirerapids"}  # OpenBLAS's kernels that use AVX-512
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
    """The OPENBLAS_CORETYPE for a CPU with `flags` on which OpenBLAS runs the kernels `core`: "SkylakeX" where
    the CPU has the AVX-512 subsets those use and `core` does not use AVX-512; "Haswell" where it has AVX2 and FMA
    and `core` is older than AVX2; else None (`core` stands)."""
    core = core.lower()
    if AVX512 <= flags:
        return None if core in AVX512_CORES else "SkylakeX"
    return "Haswell" if core in PRE_AVX2_CORES and {"avx2", "fma"} <= flags else None


def narrow_kernels_note(core: str, flags: set[str]) -> str | None:
    """One line on an OPENBLAS_CORETYPE `core` set by the user that holds OpenBLAS below the CPU's kernels."""
    wider = kernels_for(core, flags)
    if wider is None:
        return None
    return (f"mlx-flash: note: OPENBLAS_CORETYPE={core} keeps OpenBLAS off this CPU's faster {wider} kernels; "
            f"unset it, or set {wider}.")


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
    if "OPENBLAS_CORETYPE" in os.environ:
        if note := narrow_kernels_note(os.environ["OPENBLAS_CORETYPE"], cpu_flags()):
            print(note, file=sys.stderr)
    elif core := core_type(library):
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
