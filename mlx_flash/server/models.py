"""The models a server was started with, loaded when first asked for and kept while memory allows."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..loading import load_pipeline
from ..lora import check_scale
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
    loras: tuple[tuple[str, float], ...] = ()  # (file or ORG/REPO/FILE.safetensors, start scale), as --lora gives


def lora_name(source: str) -> str:
    """The name requests use for a LoRA the server was started with: its file's stem."""
    return Path(source).stem


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
        self.loras = {lora_name(source): scale for source, scale in options.loras}  # name -> start scale
        if len(self.loras) != len(options.loras):
            raise ValueError("two --lora files have the same file name; rename one (requests name LoRAs by it).")
        self.default = next(iter(self.sources))
        self._pipes: dict[str, Pipeline] = {}
        self._own_scales: dict[str, tuple[float, ...]] = {}  # a preset's own LoRA, loaded before the served ones
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

    def lora_scales(self, value: Any) -> tuple[tuple[str, float], ...]:
        """A request's `loras` field -> (name, scale) of each LoRA the server was started with, in order: None
        keeps the start scales; a list of {"name", "scale"} objects (or "name[:scale]" strings) applies those
        LoRAs, at their start scale when none is given, and sets the others to 0."""
        if value is None:
            return tuple(self.loras.items())
        if not isinstance(value, list):
            raise ApiError(400, "'loras' must be a list of {\"name\": ..., \"scale\": ...} objects.", param="loras")
        chosen: dict[str, float] = {}
        for item in value:
            name, scale = _lora_item(item)
            if name not in self.loras:
                served = ", ".join(self.loras) or "none"
                raise ApiError(400, f"unknown LoRA {name!r}; this server was started with: {served} (--lora).",
                               param="loras", code="lora_not_found")
            chosen[name] = self.loras[name] if scale is None else scale
        return tuple((name, chosen.get(name, 0.0)) for name in self.loras)

    def pipeline(self, name: str) -> Pipeline:
        """The pipeline of a served model (its components load when it first runs)."""
        with self._lock:
            if name not in self._pipes:
                o = self.options
                self._pipes[name] = load_pipeline(self.sources[name], dtype=o.dtype, quantize=o.quantize,
                                                  use_t5=o.use_t5, low_memory=o.low_memory, loras=o.loras)
                scales = self._pipes[name].loras.scales.values
                self._own_scales[name] = tuple(scales[:len(scales) - len(o.loras)])
            return self._pipes[name]

    def set_lora_scales(self, name: str, loras: tuple[tuple[str, float], ...]) -> None:
        """Give the served LoRAs of model `name` the scales of `lora_scales`' answer (a preset's own LoRA keeps
        its scale)."""
        if self.loras:
            self.pipeline(name).set_lora_scales([*self._own_scales[name], *(scale for _, scale in loras)])

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


def _lora_item(item: Any) -> tuple[str, float | None]:
    """One entry of a request's `loras`: (name, scale or None)."""
    if isinstance(item, str):
        name, sep, tail = item.rpartition(":")
        item = {"name": name, "scale": tail} if sep else {"name": item}
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise ApiError(400, f"each of 'loras' must be {{\"name\": ..., \"scale\": ...}} or \"name:scale\", "
                            f"got {item!r}.", param="loras")
    scale = item.get("scale")
    if scale is None:
        return item["name"], None
    try:
        return item["name"], check_scale(scale, item["name"])
    except ValueError as err:
        raise ApiError(400, str(err), param="loras") from None


def _weights(pipe: Pipeline) -> int:
    """Bytes of a pipeline's weights (at its default size)."""
    side = pipe.transformer_config.sample_size * pipe.vae_factor
    return sum(stage.weights for stage in pipe.estimate_memory(side, side))
