"""The server under `mlx.launch`: rank 0 serves HTTP and shares each job with the other ranks, which make their
part of its images. The images of a job are dealt out as a prompt-file job's are (distributed.Ranks.share: image
i on rank i mod size, one image per rank and round), each with the seed it has in a one-process server."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import threading
from typing import Any

import numpy as np
from PIL import Image

from ..distributed import PeerLost, Ranks
from ..request import GenerationResult
from . import engine
from .errors import ApiError
from .models import ModelPool
from .spec import ImageSpec

log = logging.getLogger("mlx_flash.server")

IMAGE_FIELDS = ("image", "mask")  # ImageSpec fields holding PIL images, sent as PNG


def spec_message(spec: ImageSpec, shape: tuple[int, int]) -> bytes:
    """`spec` (and the (height, width) of its images) as bytes for the other ranks."""
    fields: dict[str, Any] = dataclasses.asdict(spec)
    for name in IMAGE_FIELDS:
        image = getattr(spec, name)
        if image is not None:
            data = io.BytesIO()
            (image.convert("RGB") if image.mode == "CMYK" else image).save(data, format="PNG", exif=image.getexif())
            fields[name] = base64.b64encode(data.getvalue()).decode()
    return json.dumps({"spec": fields, "shape": list(shape)}).encode()


def read_spec_message(message: bytes) -> tuple[ImageSpec, tuple[int, int]]:
    decoded = json.loads(message)
    fields = decoded["spec"]
    for name in IMAGE_FIELDS:
        if fields[name] is not None:
            fields[name] = Image.open(io.BytesIO(base64.b64decode(fields[name])))
    fields["loras"] = tuple((name, scale) for name, scale in fields["loras"])
    return ImageSpec(**fields), tuple(decoded["shape"])


def image_spec(spec: ImageSpec, index: int) -> ImageSpec:
    """Image `index` of `spec` alone, with the seed it has among the others."""
    return dataclasses.replace(spec, n=1, seed=spec.seed + index)


class Cluster:
    """Rank 0's side (`run`, `stop`, on the worker's thread) and the other ranks' (`follow`, their main thread)."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks

    @property
    def size(self) -> int:
        return self.ranks.size

    def run(self, pool: ModelPool, spec: ImageSpec, *, cancel: threading.Event, on_step: engine.StepHandler,
            on_preview: engine.PreviewHandler | None = None, preview_every: int = 1) -> list[tuple[Image.Image, dict]]:
        """Rank 0: the job's images with their metadata, in order. Its own share runs with `on_step` (over the whole
        job), previews and `cancel`; a cancelled job stops on the other ranks after the image in progress."""
        fits, key = set(), pool.key(spec.model, spec.loras)
        requests = [engine.prepare(pool.pipeline(spec.model, spec.loras), image_spec(spec, i), fits, key)
                    for i in range(spec.n)]
        shape = (requests[0].height, requests[0].width)
        self.ranks.broadcast_bytes(spec_message(spec, shape))
        rounds = self.ranks.share(list(range(spec.n)))
        made: dict[int, np.ndarray] = {}
        failure: ApiError | None = None
        for k, round_ in enumerate(rounds):
            if self.ranks.broadcast([int(not cancel.is_set() and failure is None)], 1) != [1]:
                break
            own = round_[0]
            try:
                pipe = pool.acquire(spec.model, spec.loras, requests[own])
                result = engine.run(pipe, requests[own], cancel=cancel, on_preview=on_preview,
                                    preview_every=preview_every,
                                    on_step=lambda step, steps, k=k: on_step(k * steps + step, len(rounds) * steps))
                made[own] = np.array(result.images[0])
            except engine.Cancelled:
                pass
            except Exception as err:  # the others' images of this round must still be received
                log.exception("rank 0 could not make image %d", own)
                failure = ApiError(500, f"generation failed: {err}")
            for rank, index in enumerate(round_[1:], 1):
                try:
                    made[index] = self.ranks.receive(rank, (*shape, 3))
                except PeerLost as err:
                    failure = failure or ApiError(500, f"rank {rank} of the cluster could not make image {index} "
                                                       f"({err}); see that process's log.")
        if failure is not None:
            raise failure
        if cancel.is_set() or len(made) < spec.n:
            raise engine.Cancelled()
        identity = pipe.identity
        return [(Image.fromarray(made[i]), GenerationResult(None, None, requests[i], identity).metadata(0))
                for i in range(spec.n)]

    def stop(self) -> None:
        """Rank 0: tell the other ranks that the server is shutting down (if one has ended, this waits on it
        until the Ranks watchdog gives the job up)."""
        try:
            self.ranks.broadcast_bytes(None)
        except RuntimeError as err:
            log.warning("could not tell the other ranks to stop: %s", err)

    def follow(self, pool: ModelPool) -> None:
        """A rank other than 0: make this rank's share of each job rank 0 sends, until it says stop."""
        rank = self.ranks.rank
        while (message := self.ranks.broadcast_bytes(None)) is not None:
            spec, shape = read_spec_message(message)
            for round_ in self.ranks.share(list(range(spec.n))):
                if self.ranks.broadcast(None, 1) != [1]:
                    break
                if rank >= len(round_):
                    continue
                try:
                    request = engine.prepare(pool.pipeline(spec.model, spec.loras), image_spec(spec, round_[rank]))
                    pipe = pool.acquire(spec.model, spec.loras, request)
                    pixels, failed = np.array(pipe.run(request).images[0]), False
                except Exception:
                    log.exception("rank %d could not make image %d", rank, round_[rank])
                    pixels, failed = np.zeros((*shape, 3), np.uint8), True
                self.ranks.send(pixels, failed=failed)
        pool.release()
