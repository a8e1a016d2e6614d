"""Lanes for MLX's CPU backend: a transformer's tokens, or an image's rows, cut into slices computed side by side,
each on its own CPU stream. MLX runs each stream on its own thread but each element-wise operation on one core, so
one stream leaves the other cores idle outside the matmuls; with one lane per core, the norms, activations and
softmax run in parallel, and each lane's matmuls take its share of OpenBLAS's threads. In the transformer only
attention mixes tokens: it takes every lane's keys and values (benchmarks/mmdit_step.py). In the VAE (`Bands`)
convolutions read their neighbours' edge rows and GroupNorm adds up every band's sums (benchmarks/vae_decode.py)."""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator, Sequence

import mlx.core as mx

from .blas import blas_threads
from .cpu_ops import on_cpu

MAX_LANES = 2  # measured on two cores (benchmarks/mmdit_step.py); each lane matmuls with cores // lanes threads


def cpu_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_THREAD_STREAMS = threading.local()  # MLX's streams belong to the thread that made them


def cpu_streams(count: int) -> tuple[mx.Stream, ...]:
    """`count` CPU streams of the calling thread, made once per thread."""
    made = _THREAD_STREAMS.__dict__.setdefault("by_count", {})
    if count not in made:
        made[count] = tuple(mx.new_stream(mx.cpu) for _ in range(count))
    return made[count]


class Lanes:
    """`count` lanes, lane i computed on stream i (one lane: the default stream). With `slices` > `count` the work
    is cut into that many slices, slice i on lane i % count, and `map` evaluates them `count` at a time, each group
    before the next: one group's temporaries are alive at once instead of every slice's."""

    def __init__(self, count: int = 1, slices: int | None = None):
        self.count = count
        self.slices = max(slices or count, count)
        self.streams: Sequence[mx.Stream | None] = cpu_streams(count) if count > 1 else (None,)

    @classmethod
    def for_inference(cls, tokens: int) -> "Lanes":
        """Lanes for `tokens` tokens: one per core up to MAX_LANES on MLX's Linux CPU backend (with OpenBLAS, whose
        threads `running` shares out, or with MLX's own single-threaded BLAS); one elsewhere (a GPU; macOS's
        Accelerate threads its matmuls by itself)."""
        return cls(cls.inference_count(tokens))

    @staticmethod
    def inference_count(tokens: int) -> int:
        """How many lanes `for_inference` makes for `tokens` tokens."""
        return max(min(MAX_LANES, cpu_cores(), tokens) if on_cpu() and sys.platform == "linux" else 1, 1)

    def sliced(self, slices: int | None) -> "Lanes":
        """These lanes with the work cut into `slices` slices (None: one per lane)."""
        return Lanes(self.count, slices)

    def split(self, x: mx.array, axis: int = 1) -> list[mx.array]:
        """`x` cut along `axis` into `slices` slices, sizes as equal as they can be."""
        if self.slices == 1:
            return [x]
        n = x.shape[axis]
        bounds = [n * i // self.slices for i in range(self.slices + 1)]
        return list(mx.split(x, bounds[1:-1], axis=axis))

    def join(self, parts: Sequence[mx.array], axis: int = 1) -> mx.array:
        """The lanes' slices put back together along `axis`."""
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=axis)

    def map(self, fn: Callable, *per_slice: Sequence) -> list:
        """[fn(*args of slice i) for each slice], slice i's work built on lane i % count's stream; with more slices
        than lanes, evaluated a group of `count` slices at a time."""
        results = self.build(fn, *per_slice)
        if self.slices > self.count:
            for start in range(0, self.slices, self.count):
                mx.eval(results[start : start + self.count])
        return results

    def build(self, fn: Callable, *per_slice: Sequence) -> list:
        """As `map`, left unevaluated."""
        results = []
        for i, args in zip(range(self.slices), zip(*per_slice), strict=True):
            stream = self.streams[i % self.count]
            with mx.stream(stream) if stream is not None else nullcontext():
                results.append(fn(*args))
        return results

    @contextmanager
    def running(self) -> Iterator[None]:
        """Within the block, each lane's matmuls use its share of OpenBLAS's threads (evaluate inside it)."""
        with blas_threads(max(1, cpu_cores() // self.count)) if self.count > 1 else nullcontext():
            yield


class Bands:
    """An NHWC image cut into horizontal bands, one per slice of its lanes: row-by-row work runs on the bands side
    by side (and, with more slices than lanes, a group of bands at a time)."""

    def __init__(self, parts: Sequence[mx.array], lanes: Lanes):
        self.parts, self.lanes = list(parts), lanes

    @classmethod
    def cut(cls, x: mx.array, lanes: Lanes) -> "Bands":
        """`x` (B, H, W, C) cut into one band of rows per slice of `lanes`, into fewer if it has fewer rows (a
        stride-2 convolution's output)."""
        if x.shape[1] < lanes.slices:
            rows = max(x.shape[1], 1)
            lanes = Lanes(min(lanes.count, rows), rows)
        return cls(lanes.split(x, axis=1), lanes)

    def join(self) -> mx.array:
        """The whole image."""
        return self.lanes.join(self.parts, axis=1)

    def recut(self, x: mx.array) -> "Bands":
        """Another image (any height) cut into bands on the same lanes."""
        return Bands.cut(x, self.lanes)

    def map(self, fn: Callable, *per_band: Sequence) -> "Bands":
        """The bands [fn(band i, *(s[i] for s in per_band))], each computed on its lane."""
        return Bands(self.lanes.map(fn, self.parts, *per_band), self.lanes)

    @property
    def height(self) -> int:
        """The image's rows."""
        return sum(part.shape[1] for part in self.parts)

    def edges(self, rows: int) -> tuple[list[mx.array | None], list[mx.array | None]]:
        """The `rows` image rows just above each band and just below it (None at the image's top and bottom, and
        for rows=0); each band must have at least `rows` rows."""
        if rows == 0:
            return [None] * len(self.parts), [None] * len(self.parts)
        above = [None] + [part[:, -rows:] for part in self.parts[:-1]]
        below = [part[:, :rows] for part in self.parts[1:]] + [None]
        return above, below

    def pointwise(self, fn: Callable[[mx.array], mx.array]) -> "Bands":
        """The bands fn(band), for an fn that maps each row on its own (a norm, an activation, repeating rows), left to
        the next `map` to compute inside each band's work: with more slices than lanes, never the whole image's."""
        return Pointwise(self, fn)

    def rows(self, start: int, stop: int) -> "Bands":
        """The image's rows [start, stop), each band keeping those it holds (possibly none)."""
        parts, top = [], 0
        for part in self.parts:
            height = part.shape[1]
            parts.append(part[:, min(max(start - top, 0), height) : min(max(stop - top, 0), height)])
            top += height
        return Bands(parts, self.lanes)


class Pointwise(Bands):
    """The bands fn(band) of `source`'s, built where they are used (`Bands.pointwise`)."""

    def __init__(self, source: Bands, fn: Callable[[mx.array], mx.array]):
        self.source, self.fn, self.lanes = source, fn, source.lanes

    @property
    def parts(self) -> list[mx.array]:
        return self.lanes.build(self.fn, self.source.parts)

    def map(self, fn: Callable, *per_band: Sequence) -> Bands:
        return self.source.map(lambda part, *args: fn(self.fn(part), *args), *per_band)

    def edges(self, rows: int) -> tuple[list[mx.array | None], list[mx.array | None]]:
        """fn of the source's edge rows, cut to `rows` rows (fn may repeat rows)."""
        above, below = self.source.edges(rows)
        return ([None if e is None else self.fn(e)[:, -rows:] for e in above],
                [None if e is None else self.fn(e)[:, :rows] for e in below])
