"""The models a server was started with, loaded when first asked for and kept while memory allows."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from ..loading import load_pipeline
from ..memory import memory_budget
from ..pipeline import Pipeline
from .errors import ApiError

log = logging.getLogger("mlx_flash.server")


@dataclass(frozen=True)
class ModelOptions:
    """How every served model loads (the `serve` command's flags)."""

    dtype: str | None = None
    quantize: int | None = None
    use_t5: bool = True
    low_memory: bool | None = None


def served_name(source: str) -> str:
    """The name clients use for a model: a preset, packaged model or repo id as given, a local path's folder or
    file name."""
    path = Path(source)
    return path.name if path.is_absolute() or source.startswith((".", "~")) or path.exists() else source


class ModelPool:
    """Pipelines by name, only for the models given at start (a request never names a path). Pipelines are
    made on first use; before one runs, the least recently run others are released until the weights of those
    still loaded and of this one fit the memory budget."""

    def __init__(self, sources: list[str], options: ModelOptions):
        if not sources:
            raise ValueError("no model to serve; pass --model NAME (e.g. --model digits-flash).")
        self.sources = {served_name(s): s for s in sources}
        if len(self.sources) != len(sources):
            raise ValueError("two --model values have the same name; pass each model once.")
        self.options = options
        self.default = next(iter(self.sources))
        self._pipes: dict[str, Pipeline] = {}
        self._ran: list[str] = []  # models that have run (so hold weights), least recently run first
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self.sources)

    def resolve(self, name: str | None) -> str:
        """A request's model field -> a served name; None or "" -> the first model given at start."""
        if name is None or name == "":
            return self.default
        if not isinstance(name, str):
            raise ApiError(400, f"'model' must be a string, got {type(name).__name__}.", param="model")
        if name in self.sources:
            return name
        served = ", ".join(self.sources)
        if "/" in name or "\\" in name or name.startswith((".", "~")):
            raise ApiError(400, f"'model' {name!r} looks like a path or repo id; the server loads only the models it "
                                f"was started with: {served}.", param="model", code="model_not_found")
        raise ApiError(404, f"model {name!r} is not served here; use one of: {served}.", param="model",
                       code="model_not_found")

    def pipeline(self, name: str) -> Pipeline:
        """The pipeline of a served model (its components load when it first runs)."""
        with self._lock:
            if name not in self._pipes:
                o = self.options
                self._pipes[name] = load_pipeline(self.sources[name], dtype=o.dtype, quantize=o.quantize,
                                                  use_t5=o.use_t5, low_memory=o.low_memory)
            return self._pipes[name]

    def acquire(self, name: str) -> Pipeline:
        """`pipeline(name)`, most recently used, after releasing others whose weights would not fit beside it
        (called by the worker only, so nothing it releases is running)."""
        pipe = self.pipeline(name)
        with self._lock:
            if name in self._ran:
                self._ran.remove(name)
            budget = memory_budget()
            while self._ran and sum(_weights(self._pipes[n]) for n in [*self._ran, name]) > budget:
                evicted = self._ran.pop(0)
                log.info("releasing %s to make room for %s", evicted, name)
                self._pipes[evicted].release()
            self._ran.append(name)
        return pipe


    def release(self) -> None:
        """Free every model's weights (the pipelines stay, to load again when next run)."""
        with self._lock:
            for name in self._ran:
                self._pipes[name].release()
            self._ran.clear()


def _weights(pipe: Pipeline) -> int:
    """Bytes of a pipeline's weights (at its default size)."""
    side = pipe.transformer_config.sample_size * pipe.vae_factor
    return sum(stage.weights for stage in pipe.estimate_memory(side, side))
