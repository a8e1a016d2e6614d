"""`mlx-flash launch [mlx.launch options] COMMAND ...`: MLX's launcher running `mlx-flash COMMAND ...` on every
rank, exiting with the status of the lowest rank that failed. (`mlx.launch` itself exits 0 whatever its ranks do:
it only prints a warning for each that failed, which this reads.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

# What mlx.launch (MLX 0.32) prints on stderr for a rank that failed.
RANK_FAILED = re.compile(r"Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")


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


def main(argv: list[str]) -> int:
    if argv in (["-h"], ["--help"]):
        print(__doc__.split("\n\n")[0])
        return 0
    options, command = split(argv)
    launcher, program = shutil.which("mlx.launch"), shutil.which("mlx-flash")
    if launcher is None or program is None:
        raise OSError("mlx.launch or mlx-flash is not on PATH; install mlx-flash (with mlx) in this environment.")
    process = subprocess.Popen([launcher, *options, program, *command], stderr=subprocess.PIPE, text=True,
                               errors="replace")
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
