"""Jobs and the one worker thread that runs them, in order, from a bounded queue."""

from __future__ import annotations

import base64
import io
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import mlx.core as mx
from PIL import Image

from ..denoise import NonFiniteError
from ..image_io import png_bytes
from ..request import GenerationRequest
from . import engine
from .cluster import Cluster
from .errors import ApiError
from .models import ModelPool
from .spec import OUTPUT_FORMATS, ImageSpec

log = logging.getLogger("mlx_flash.server")

FINISHED = ("succeeded", "failed", "cancelled")
# Finished jobs kept (with their images) for GET /v1/jobs/{id}: the newest, up to both limits.
KEEP_FINISHED = 64
KEEP_BYTES = 256 * 2**20


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down; send the request again later.")


@dataclass
class Job:
    """One request's run: its status, events (steps, previews) and, once done, its encoded images."""

    spec: ImageSpec
    request: GenerationRequest
    previews: bool = False  # decode previews (for jobs someone may watch; not for requests that wait)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)
    status: str = "queued"  # queued -> running -> succeeded | failed | cancelled
    step: int = 0
    steps: int = 0
    error: ApiError | None = None
    images: list[bytes] = field(default_factory=list)  # encoded in spec.output_format
    seeds: list[int] = field(default_factory=list)
    metadata: list[dict] = field(default_factory=list)  # per image: everything that determines its pixels
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    events: list[tuple[str, dict]] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def publish(self, name: str, data: dict) -> None:
        """Add an event; only the latest preview keeps its image (bounded memory)."""
        with self._changed:
            if name == "preview":
                self.events = [(n, {"step": d["step"]} if n == "preview" else d) for n, d in self.events]
            self.events.append((name, data))
            self._changed.notify_all()

    def follow(self, keepalive: float = 10.0) -> Iterator[tuple[str, dict] | None]:
        """Every event from the first, waiting for new ones until the job finishes; None after `keepalive`
        seconds without one (for the stream to send a comment)."""
        index = 0
        while True:
            with self._changed:
                if index == len(self.events) and not self.done.is_set():
                    self._changed.wait(keepalive)
                new, index = self.events[index:], len(self.events)
                finished = self.done.is_set() and index == len(self.events)
            yield from new
            if finished:
                return
            if not new:
                yield None

    def finish(self, status: str, error: ApiError | None = None) -> None:
        self.status, self.error = status, error
        data = {"status": status, **({"error": error.message} if error else {})}
        if status == "succeeded":
            data["seeds"] = self.seeds
        with self._changed:
            self.events.append((status, data))
            self.done.set()
            self._changed.notify_all()

    def describe(self, base_url: str) -> dict:
        """The job's status as GET /v1/jobs/{id} answers it."""
        return {
            "id": self.id, "object": "image.job", "status": self.status, "created": int(self.created),
            "progress": {"step": self.step, "steps": self.steps}, "settings": self.spec.settings(),
            "error": self.error.body()["error"] if self.error else None,
            "images": [{"url": image_url(base_url, self, i), "seed": s} for i, s in enumerate(self.seeds)],
        }


def image_url(base_url: str, job: Job, index: int) -> str:
    return f"{base_url}/v1/jobs/{job.id}/images/{index}.{job.spec.output_format}"


def encode(image: Image.Image, metadata: dict, output_format: str, compression: int | None) -> bytes:
    """PNG with the generation metadata in text chunks, or JPEG / WebP at quality `compression`."""
    if output_format == "png":
        return png_bytes(image, metadata)
    data = io.BytesIO()
    image.save(data, format=OUTPUT_FORMATS[output_format], quality=95 if compression is None else compression)
    return data.getvalue()


def preview_url(image: Image.Image) -> str:
    data = io.BytesIO()
    image.save(data, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(data.getvalue()).decode()


def free_streams() -> None:
    """End the MLX streams of this thread (left for the interpreter's exit, they abort it)."""
    mx.synchronize()
    mx.clear_streams()


class Worker:
    """Runs jobs one at a time on its own thread; at most `max_queue` wait behind the running one."""

    def __init__(self, pool: ModelPool, max_queue: int, preview_every: int = 1, cluster: Cluster | None = None):
        if max_queue < 1:
            raise ValueError(f"--max-queue must be >= 1, got {max_queue}.")
        if preview_every < 0:
            raise ValueError(f"--preview-every must be >= 0 (0: no previews), got {preview_every}.")
        self.pool, self.preview_every, self.cluster = pool, preview_every, cluster  # cluster: under mlx.launch
        self._fits: set[tuple] = set()  # request shapes whose memory check passed
        self._stopping = False
        self._queue: queue.Queue[Job | None] = queue.Queue(max_queue)
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._seconds = 1.0  # running mean of a job's time, for Retry-After
        self.running: Job | None = None
        # The checks build lazy MLX modules (the memory estimate): on one thread of their own, as the runs are on
        # the worker's, so that the request threads never hold MLX streams.
        self._checker = ThreadPoolExecutor(1, thread_name_prefix="mlx-flash-checks")
        self._thread = threading.Thread(target=self._loop, name="mlx-flash-worker", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, spec: ImageSpec, previews: bool = False) -> Job:
        """Check `spec` against its model and queue it; a full queue is a 429 with Retry-After."""
        if self._queue.full():  # before the checks, which cost more than this answer
            raise self._queue_full()
        try:
            request = self._checker.submit(self._prepare, spec).result()
        except RuntimeError:  # the checker was shut down
            if self._stopping:
                raise shutting_down() from None
            raise
        job = Job(spec, request, previews)
        with self._lock:
            if self._stopping:
                raise shutting_down()
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise self._queue_full() from None
            self._jobs[job.id] = job
            self._forget_old()
        job.publish("queued", {"id": job.id, "position": self.waiting})
        return job

    def _prepare(self, spec: ImageSpec) -> GenerationRequest:
        """On the checker's thread: the model's pipeline (made there when first asked for) checks `spec`."""
        return engine.prepare(self.pool.pipeline(spec.model, spec.loras), spec, self._fits,
                              self.pool.key(spec.model, spec.loras))

    def _queue_full(self) -> ApiError:
        retry = max(1, round(self._seconds * (self.waiting + 1)))
        return ApiError(429, f"the queue is full ({self.waiting} jobs waiting); retry in about {retry} s.",
                        code="queue_full", headers={"Retry-After": str(retry)})

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r}; it never existed or finished long ago.", param="id")
        return job

    def cancel(self, job: Job) -> None:
        """Stop a job: a queued one is cancelled now, a running one stops after its current step."""
        with self._lock:
            job.cancel.set()
            if job.status == "queued":
                job.finish("cancelled")

    def stop(self, cancel_running: bool = False) -> None:
        """Refuse new jobs, cancel the queued ones, let the running one finish (or cancel it), end the thread."""
        with self._lock:
            self._stopping = True
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None and not job.done.is_set():
                    job.cancel.set()
                    job.finish("cancelled", shutting_down())
        if cancel_running and self.running is not None:
            self.running.cancel.set()
        self._queue.put(None)
        self._thread.join()
        self._checker.submit(free_streams).result()
        self._checker.shutdown()

    @property
    def kept(self) -> int:
        """Jobs held: queued, running, and finished ones not yet forgotten."""
        return len(self._jobs)

    def forget(self, job: Job) -> None:
        """Drop a finished job whose images were sent and need no URL."""
        with self._lock:
            self._jobs.pop(job.id, None)

    def _forget_old(self) -> None:
        kept, size = 0, 0
        for job_id, job in reversed(list(self._jobs.items())):
            if job.done.is_set():
                kept, size = kept + 1, size + sum(map(len, job.images))
                if kept > KEEP_FINISHED or size > KEEP_BYTES:
                    del self._jobs[job_id]

    def _loop(self) -> None:
        try:
            self._serve_jobs()
        finally:
            if self.cluster is not None:
                self.cluster.stop()
            # The weights loaded and the streams made on this thread go with it.
            self.pool.release()
            free_streams()

    def _serve_jobs(self) -> None:
        while (job := self._queue.get()) is not None:
            with self._lock:
                if job.done.is_set():  # cancelled while queued
                    continue
                job.status = "running"
            self.running, start = job, time.perf_counter()
            try:
                self._run(job)
            finally:
                self.running = None
                self._seconds = 0.8 * self._seconds + 0.2 * (time.perf_counter() - start)

    def _run(self, job: Job) -> None:
        job.publish("started", {"id": job.id})

        def on_step(step: int, steps: int) -> None:
            job.step, job.steps = step, steps
            job.publish("step", {"step": step, "steps": steps})

        def on_preview(image: Image.Image) -> None:
            job.publish("preview", {"step": job.step, "image": preview_url(image)})

        try:
            previews = on_preview if job.previews and self.preview_every else None
            if self.cluster is None:
                pipe = self.pool.acquire(job.spec.model, job.spec.loras, job.request)
                result = engine.run(pipe, job.request, on_step=on_step, cancel=job.cancel, on_preview=previews,
                                    preview_every=self.preview_every)
                made = [(image, result.metadata(i)) for i, image in enumerate(result.images)]
            else:
                made = self.cluster.run(self.pool, job.spec, cancel=job.cancel, on_step=on_step, on_preview=previews,
                                        preview_every=self.preview_every)
            job.metadata = [metadata for _, metadata in made]
            job.images = [encode(image, metadata, job.spec.output_format, job.spec.compression)
                          for image, metadata in made]
            job.seeds = [metadata["seed"] for metadata in job.metadata]
        except engine.Cancelled:
            job.finish("cancelled")
        except (ValueError, MemoryError) as err:
            status = 500 if isinstance(err, NonFiniteError) else 400
            job.finish("failed", ApiError(status, str(err)))
        except Exception as err:  # a bug or a broken model: the job fails, the worker lives on
            log.exception("job %s failed", job.id)
            job.finish("failed", ApiError(500, f"generation failed: {err}"))
        else:
            job.finish("succeeded")
