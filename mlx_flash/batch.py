"""Batch jobs: a prompt file (one prompt a line, or JSON Lines with per-line settings) expanded into images,
each with its seed and output path; which of them a resumed job still has to make."""

from __future__ import annotations

import json
import logging
import os
import re
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .image_io import read_metadata

log = logging.getLogger("mlx_flash")

# JSON Lines keys -> their type; "size" is "WxH".
LINE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "prompt": str, "negative_prompt": str, "seed": int, "steps": int, "guidance": (int, float), "size": str,
    "width": int, "height": int, "sampler": str, "shift": (int, float), "num_images": int,
}
PATTERN_FIELDS = ("index", "seed", "line", "n", "prompt")
DEFAULT_PATTERN = "{index:05d}-{seed}.png"
IGNORED_WHEN_RESUMING = ("mlx_flash_version",)  # a newer version may still skip what an older one made


@dataclass(frozen=True)
class JobLine:
    """One line of a prompt file: its number (from 1) and its settings."""

    number: int
    settings: dict[str, Any]


@dataclass(frozen=True)
class JobImage:
    """One image of a job: its place in the whole job, the line it comes from, and what to call generate with."""

    index: int  # 0-based over the whole job
    line: int  # line number in the prompt file
    n: int  # image within its line
    seed: int
    generate: dict[str, Any] = field(hash=False)  # Pipeline.request keyword arguments (prompt included)
    path: Path = Path()


def _line_error(path: Path, number: int, message: str) -> ValueError:
    return ValueError(f"{path}:{number}: {message}")


def _check_line(path: Path, number: int, settings: Any) -> dict[str, Any]:
    if not isinstance(settings, dict):
        raise _line_error(path, number, f"expected a JSON object, got {type(settings).__name__}")
    unknown = sorted(set(settings) - set(LINE_FIELDS))
    if unknown:
        raise _line_error(path, number, f"unknown field {unknown[0]!r}; the fields are {', '.join(LINE_FIELDS)}")
    if "prompt" not in settings:
        raise _line_error(path, number, "no \"prompt\" field")
    for key, value in settings.items():
        kind = LINE_FIELDS[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
            raise _line_error(path, number, f"{key} must be {names}, got {json.dumps(value)}")
    if "size" in settings:
        match = re.fullmatch(r"(\d+)x(\d+)", settings["size"])
        if not match:
            raise _line_error(path, number, f"size must read WIDTHxHEIGHT (e.g. 512x512), got {settings['size']!r}")
        settings = {**settings, "width": int(match[1]), "height": int(match[2])}
        del settings["size"]
    if settings.get("num_images", 1) < 1:
        raise _line_error(path, number, f"num_images must be at least 1, got {settings['num_images']}")
    return settings


def read_prompt_file(path: str | Path) -> list[JobLine]:
    """The lines of a prompt file. A file ending in .jsonl, or whose first entry starts with "{", is JSON Lines
    (one object a line, see LINE_FIELDS); otherwise each line is a prompt. Blank lines and lines starting with
    "#" are skipped. A malformed line is reported with its number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompt file; check the --prompt-file path.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8.") from None
    entries = [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1)
               if line.strip() and not line.lstrip().startswith("#")]
    if not entries:
        raise ValueError(f"{path}: no prompts in this file; write one prompt a line.")
    jsonl = path.suffix.lower() == ".jsonl" or entries[0][1].startswith("{")
    lines = []
    for number, line in entries:
        if not jsonl:
            lines.append(JobLine(number, {"prompt": line}))
            continue
        try:
            settings = json.loads(line)
        except json.JSONDecodeError as err:
            raise _line_error(path, number, f"not valid JSON ({err.msg} at column {err.colno})") from None
        lines.append(JobLine(number, _check_line(path, number, settings)))
    return lines


def _slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:length] or "image"


def output_path(pattern: str, image: JobImage) -> Path:
    """The file name `pattern` gives an image ({index}, {seed}, {line}, {n}, {prompt} as a short slug)."""
    try:
        return Path(pattern.format(index=image.index, seed=image.seed, line=image.line, n=image.n,
                                   prompt=_slug(image.generate["prompt"])))
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"--output pattern {pattern!r}: {err}; use the fields {', '.join(PATTERN_FIELDS)}, "
                         "e.g. 'out/{index:04d}-{seed}.png'.") from None


def expand(lines: list[JobLine], defaults: dict[str, Any], base_seed: int, pattern: str) -> list[JobImage]:
    """Every image of the job in order. Line settings override `defaults` (the command line's); image j of a
    line with a seed s gets s + j, any other image base_seed + its index in the job, so each image's seed does
    not depend on how the job is split."""
    fields = {name for _, name, _, _ in string.Formatter().parse(pattern) if name}
    if not fields <= set(PATTERN_FIELDS):
        raise ValueError(f"--output pattern {pattern!r}: unknown field {sorted(fields - set(PATTERN_FIELDS))[0]!r}; "
                         f"use {', '.join(PATTERN_FIELDS)}.")
    images = []
    for line in lines:
        settings = {**defaults, **line.settings}
        count = settings.pop("num_images", 1)
        own_seed = settings.pop("seed", None)
        generate = {"num_inference_steps" if k == "steps" else "guidance_scale" if k == "guidance" else k: v
                    for k, v in settings.items() if v is not None}
        for n in range(count):
            index = len(images)
            seed = own_seed + n if own_seed is not None else base_seed + index
            image = JobImage(index, line.number, n, seed, generate)
            images.append(JobImage(index, line.number, n, seed, generate, output_path(pattern, image)))
    taken: dict[Path, JobImage] = {}
    for image in images:
        if image.path in taken:
            raise ValueError(f"--output pattern {pattern!r} names images {taken[image.path].index} and {image.index} "
                             f"both {image.path}; include {{index}} in it.")
        taken[image.path] = image
    return images


def is_done(path: Path, expected: dict[str, Any]) -> bool:
    """Whether `path` holds an image made with `expected` metadata (a resumed job skips it)."""
    try:
        found = read_metadata(path)
    except (OSError, ValueError):
        return False
    keys = (set(found) | set(expected)) - set(IGNORED_WHEN_RESUMING)
    return all(found.get(k) == expected.get(k) for k in keys)


class JobIncomplete(ValueError):
    """Some images of a job were not made (a process of a distributed job was lost)."""


def run_job(pipe, images: list[JobImage], *, source: Path, resume: bool, force: bool,
            callbacks: list | None = None) -> list[Path]:
    """Make the job's images (on every rank of an `mlx.launch` job, rank 0 writing every file) and return the
    paths written. Every line's settings are checked, and existing files looked at, before anything runs."""
    from tqdm import tqdm

    from .distributed import PeerLost, Ranks
    from .image_io import save_png
    from .request import GenerationResult

    written: list[Path] = []

    def give_up() -> None:  # rank 0 waited on a process that died: report what is missing and end
        done = set(written)
        missing = [i for i in todo if images[i].path not in done]
        print(f"mlx-flash: error: {incomplete(missing, lost or {'another'})}", file=sys.stderr, flush=True)
        os._exit(1)

    def incomplete(missing: list[int], ranks_lost) -> str:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        return (f"{len(missing)} of {len(images)} images are missing (job indices {shown}) because rank(s) "
                f"{', '.join(map(str, sorted(ranks_lost)))} of the job were lost; run the same command with --resume "
                "to make them.")

    lost: set = set()
    ranks = Ranks(stuck=give_up)
    requests = []
    for image in images:
        try:
            requests.append(pipe.request(seed=image.seed, **image.generate))
        except ValueError as err:
            raise ValueError(f"{source}:{image.line}: {err}") from None

    def metadata(i: int) -> dict[str, Any]:
        return json.loads(json.dumps(GenerationResult(None, None, requests[i], pipe.identity).metadata(0)))

    todo: list[int] | None = None
    try:
        if ranks.rank == 0:
            todo = []
            for image in images:
                if image.path.exists() and not force:
                    if resume and is_done(image.path, metadata(image.index)):
                        continue
                    raise FileExistsError(
                        f"{image.path} already exists{' with other settings' if resume else ''}; pass --force to "
                        f"overwrite it{'' if resume else ', --resume to skip finished images'}, or choose another "
                        "--output pattern.")
                todo.append(image.index)
    finally:
        todo = ranks.broadcast(todo, len(images))  # None tells the other ranks that rank 0 refused the job
    if todo is None:
        raise SystemExit(1)

    bar = tqdm(total=len(todo), desc="images", disable=ranks.rank != 0)
    for round_ in ranks.share(todo):
        own = round_[ranks.rank] if ranks.rank < len(round_) else None
        pixels = None
        if own is not None:
            result = pipe.run(requests[own], callbacks=callbacks or [])
            pixels = np.array(result.images[0])
        if ranks.rank == 0:
            arrivals = [(own, pixels)]
            for source_rank, index in enumerate(round_[1:], 1):
                if source_rank in lost:
                    continue
                request = requests[index]
                try:
                    arrivals.append((index, ranks.receive(source_rank, (request.height, request.width, 3))))
                except PeerLost:
                    lost.add(source_rank)
                    log.warning("lost rank %d of the job; finishing the other shares", source_rank)
            for index, image_pixels in arrivals:
                written.append(save_png(Image.fromarray(image_pixels), images[index].path, metadata(index),
                                        overwrite=force))
                bar.update()
        elif pixels is not None and not lost:
            try:
                ranks.send(pixels)
            except PeerLost:
                lost.add(0)
                log.warning("lost rank 0 of the job, which writes the files; this rank stops.")
                break
    bar.close()
    if ranks.rank == 0 and len(written) < len(todo):
        done = set(written)
        raise JobIncomplete(incomplete([i for i in todo if images[i].path not in done], lost))
    if ranks.rank != 0 and lost:
        raise JobIncomplete("lost rank 0 of the job; run the same command with --resume to finish it.")
    return written
