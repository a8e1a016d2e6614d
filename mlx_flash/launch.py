"""`mlx-flash launch [mlx.launch options] COMMAND ...`: MLX's launcher running `mlx-flash COMMAND ...` on every
rank, exiting with the status of the lowest rank that failed. (`mlx.launch` itself exits 0 whatever its ranks do:
it only prints a warning for each that failed, which this reads.)

MLX's launcher (0.32) forwards its input to every rank's stdin from an I/O loop that selects each rank's stdin pipe
for writing on every turn, and its own stdin for reading: a pipe is nearly always writable and a stdin at its end
always readable, so the loop never waits and keeps more than a core busy for the whole job, taken from the ranks
on the launching machine. No mlx-flash command reads input, so this runs MLX's launcher with a select that waits
for the ranks' output only (QUIET_LAUNCHER), where this MLX's launcher has that shape."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

# What mlx.launch (MLX 0.32) prints on stderr for a rank that failed.
RANK_FAILED = re.compile(r"Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")
# MLX's launcher, its select waiting for output only: nothing read from stdin (fd 0), nothing written to the ranks.
# A rank's thread whose output has ended (nothing left to read) waits 10 ms at a time for the rank's process to end.
QUIET_LAUNCHER = """
import select, sys
from mlx._distributed_utils import launch

def wait_for_output(read, write, error, timeout):
    output = [fd for fd in read if fd != 0]
    return select.select(output, [], [], timeout if read else min(timeout, 0.01))[0], [], []

launch.select = wait_for_output
sys.argv[0] = "mlx.launch"
sys.exit(launch.main())
"""


def split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(mlx.launch's options, the mlx-flash command line): the command starts at the first command name."""
    commands = _commands()
    start = next((i for i, arg in enumerate(argv) if arg in commands), None)
    if start is None:
        raise ValueError(f"launch needs an mlx-flash command ({', '.join(commands)}) after mlx.launch's options, "
                         "e.g. mlx-flash launch -n 2 --backend ring generate --prompt-file job.jsonl.")
    return argv[:start], argv[start:]


def _commands() -> list[str]:
    """The mlx-flash commands a rank can run: the CLI's, but launch itself."""
    from .cli import build_parser

    parser = build_parser()
    choices = next(a.choices for a in parser._subparsers._group_actions if a.choices)
    return [name for name in choices if name != "launch"]


def exit_status(failures: dict[int, int | None]) -> int:
    """The status of the lowest failed rank (a signal as 128 + its number, a killed rank 1); 0 if none failed."""
    if not failures:
        return 0
    code = failures[min(failures)]
    return 1 if code is None else 128 - code if code < 0 else code


def launcher() -> list[str]:
    """The command that starts MLX's launcher: QUIET_LAUNCHER where MLX's launcher module has the `select` and
    `main` it relies on, else `mlx.launch` as it is."""
    try:
        from mlx._distributed_utils import launch
    except ImportError:
        launch = None
    if callable(getattr(launch, "select", None)) and callable(getattr(launch, "main", None)):
        return [sys.executable, "-c", QUIET_LAUNCHER]
    command = shutil.which("mlx.launch")
    if command is None:
        raise OSError("mlx.launch is not on PATH; install mlx-flash (with mlx) in this environment.")
    return [command]


def main(argv: list[str]) -> int:
    if argv in (["-h"], ["--help"]):
        print(__doc__.split("\n\n")[0])
        return 0
    options, command = split(argv)
    program = shutil.which("mlx-flash")
    if program is None:
        raise OSError("mlx-flash is not on PATH; install mlx-flash (with mlx) in this environment.")
    process = subprocess.Popen([*launcher(), *options, program, *command], stdin=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, errors="replace")
    failures: dict[int, int | None] = {}
    try:
        for line in process.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            if match := RANK_FAILED.search(line):
                failures[int(match[1])] = None if match[2] is None else int(match[2])
    except KeyboardInterrupt:  # the terminal's Ctrl-C reached mlx.launch too: let it stop its ranks
        pass
    status = process.wait()
    return status if status != 0 else exit_status(failures)
