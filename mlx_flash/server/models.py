"""The models and LoRAs a server was started with: pipelines by (model, quantization, LoRA set), made when first
asked for and kept while memory allows."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..loading import load_pipeline
from ..lora import check_scale
from ..memory import memory_budget, required_bytes
from ..pipeline import Pipeline
from ..request import GenerationRequest
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


@dataclass(frozen=True)
class PipelineKey:
    """What a loaded pipeline is: a served model, its quantization and the served LoRAs attached to it (those a
    request applies at a non-zero scale, in the order the server was started with)."""

    model: str
    quantize: int | None
    loras: tuple[str, ...]


class ModelPool:
    """Pipelines by (model, quantization, LoRA set), only for the models and LoRAs given at start (a request never
    names a path). A pipeline is made when a request first needs it; its LoRAs' scales change per request without
    reloading. Before one runs, the least recently run others are dropped (weights freed, memory returned with
    mx.clear_cache) until those kept and this run's peak fit the memory budget (mlx_flash.memory's estimates)."""

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
        self._files = {lora_name(source): source for source, _ in options.loras}
        self.default = next(iter(self.sources))
        self._pipes: OrderedDict[PipelineKey, Pipeline] = OrderedDict()  # least recently used first
        self._ran: set[PipelineKey] = set()  # pipelines that have run, so may hold their weights
        self._needs: dict[tuple, int] = {}  # (key, request shape) -> peak bytes of such a run
        self._sizes: dict[PipelineKey, int] = {}  # weights of a pipeline at its default size
        self._lock = threading.RLock()

    @property
    def names(self) -> list[str]:
        return list(self.sources)

    @property
    def loaded(self) -> list[PipelineKey]:
        """The pipelines kept, least recently used first."""
        with self._lock:
            return list(self._pipes)

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
        """A request's `loras` field -> (name, scale) of each LoRA it applies, in the order the server was started
        with: None applies every LoRA at its start scale; a list of {"name", "scale"} objects (or "name[:scale]"
        strings) applies those LoRAs, at their start scale when none is given, and no other. A scale of 0 drops
        the LoRA."""
        if value is None:
            chosen = dict(self.loras)
        elif not isinstance(value, list):
            raise ApiError(400, "'loras' must be a list of {\"name\": ..., \"scale\": ...} objects.", param="loras")
        else:
            chosen = {}
            for item in value:
                name, scale = _lora_item(item)
                if name not in self.loras:
                    served = ", ".join(self.loras) or "none"
                    raise ApiError(400, f"unknown LoRA {name!r}; this server was started with: {served} (--lora).",
                                   param="loras", code="lora_not_found")
                chosen[name] = self.loras[name] if scale is None else scale
        return tuple((name, chosen[name]) for name in self.loras if chosen.get(name, 0.0) != 0.0)

    def key(self, model: str, loras: tuple[tuple[str, float], ...] = ()) -> PipelineKey:
        return PipelineKey(model, self.options.quantize, tuple(name for name, _ in loras))

    def check(self) -> None:
        """Load every model's description with every LoRA (no weights), so that an unknown or incomplete model,
        or a LoRA that does not fit one, fails at start rather than at the first request."""
        for name in self.names:
            self._load(PipelineKey(name, self.options.quantize, tuple(self.loras)))
            self.pipeline(name)

    def pipeline(self, model: str, loras: tuple[tuple[str, float], ...] = ()) -> Pipeline:
        """The pipeline of `model` with the LoRAs of `lora_scales`' answer `loras` attached (made when first asked
        for; its components load when it first runs)."""
        key = self.key(model, loras)
        with self._lock:
            if key not in self._pipes:
                self._pipes[key] = self._load(key)
                self._pipes.move_to_end(key, last=False)  # not run yet: first to go
            return self._pipes[key]

    def _load(self, key: PipelineKey) -> Pipeline:
        o = self.options
        return load_pipeline(self.sources[key.model], dtype=o.dtype, quantize=key.quantize, use_t5=o.use_t5,
                             low_memory=o.low_memory, loras=[(self._files[name], 1.0) for name in key.loras])

    def acquire(self, model: str, loras: tuple[tuple[str, float], ...], request: GenerationRequest) -> Pipeline:
        """The pipeline for `model` and `loras` with their scales set, most recently used, after dropping the least
        recently used others until the weights they keep and `request`'s peak fit the memory budget (called by
        the worker only, so nothing dropped is running)."""
        pipe, key = self.pipeline(model, loras), self.key(model, loras)
        scales = pipe.loras.scales.values
        own = scales[:len(scales) - len(loras)]  # a preset's own LoRA, loaded before the served ones, keeps its scale
        pipe.set_lora_scales([*own, *(scale for _, scale in loras)])
        with self._lock:
            need, budget, dropped = self._need(key, pipe, request), memory_budget(), False
            while (others := [k for k in self._pipes if k != key]) and \
                    sum(self._kept(k) for k in others) + need > budget:
                log.info("releasing %s to make room for %s", others[0], key)
                self._drop(others[0])
                dropped = True
            self._pipes.move_to_end(key)
            self._ran.add(key)
        if dropped:
            mx.clear_cache()
        return pipe

    def _need(self, key: PipelineKey, pipe: Pipeline, request: GenerationRequest) -> int:
        """Peak bytes of running `request` on `pipe`, its weights included."""
        shape = (key, request.height, request.width, request.batch, request.cfg, request.max_sequence_length)
        if shape not in self._needs:
            stages = pipe.estimate_memory(request.height, request.width, request.batch, request.cfg,
                                          request.max_sequence_length, request.steps)
            self._needs[shape] = required_bytes(stages, pipe.low_memory)
        return self._needs[shape]

    def _kept(self, key: PipelineKey) -> int:
        """Bytes a pipeline holds between runs: its weights once it has run (none in low-memory mode, which frees
        each component after its stage) and its LoRA files."""
        pipe = self._pipes[key]
        adapters = sum(pipe.loras.nbytes(pipe.dtype).values())
        if key not in self._ran or pipe.low_memory:
            return adapters
        if key not in self._sizes:
            self._sizes[key] = _weights(pipe)
        return self._sizes[key]  # the adapters included

    def _drop(self, key: PipelineKey) -> None:
        self._pipes.pop(key).release()
        self._ran.discard(key)
        self._needs = {shape: n for shape, n in self._needs.items() if shape[0] != key}
        self._sizes.pop(key, None)

    def release(self) -> None:
        """Drop every pipeline (each is made again when next asked for)."""
        with self._lock:
            for key in list(self._pipes):
                self._drop(key)
        mx.clear_cache()


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
