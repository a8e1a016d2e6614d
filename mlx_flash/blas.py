"""A fast BLAS for MLX's Linux CPU backend.

MLX's Linux CPU wheel bundles a reference BLAS; with a system OpenBLAS preloaded (LD_PRELOAD) float32 matmul
runs about 30x faster. A library cannot be preloaded after the process started, so `ensure_openblas`
re-executes the running command with it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Debian / Ubuntu (libopenblas0-pthread, either architecture), then Fedora / Arch.
OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
CHECKED = "MLX_FLASH_BLAS_CHECKED"  # set once checked, so that re-executed and child processes do not check again
HINT = ("mlx-flash: note: MLX's CPU backend is ~30x slower without OpenBLAS; install it "
        "(Debian/Ubuntu: apt-get install libopenblas0-pthread) and it is used automatically.")


def find_openblas() -> str | None:
    """Path of the system's OpenBLAS shared library, or None."""
    return next((path for path in OPENBLAS_PATHS if Path(path).exists()), None)


def ensure_openblas() -> None:
    """On Linux, re-execute this process's command line with OpenBLAS preloaded, unless it already is (or was
    checked); print one line on how to install it when it is missing and MLX runs on the CPU."""
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
    if library in preload.split():
        return
    os.environ["LD_PRELOAD"] = f"{library} {preload}".strip()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
