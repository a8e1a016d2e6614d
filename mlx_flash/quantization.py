"""Which layers to quantize, and at how many bits: the one policy used by the converter and by
`load_pipeline(..., quantize=bits)`.

Only `nn.Linear` layers whose input size is a multiple of the group size are quantized (embeddings, norms
and convolutions keep their precision). The "mixed" policy keeps the transformer's conditioning path at 8
bits: the adaLN modulations (`norm1*.linear`, `norm_out.linear`), the embedders (`pos_embed`,
`context_embedder`, `time_text_embed`) and the final `proj_out`. Their errors scale or shift every token;
at 3 to 6 bits this roughly halves the transformer's output error (benchmarks/quantization.py).
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
POLICIES = ("plain", "mixed")
SENSITIVE_BITS = 8
SENSITIVE = re.compile(
    r"(pos_embed|context_embedder|time_text_embed|norm_out|proj_out)(\..+)?"
    r"|transformer_blocks\.\d+\.norm1(_context)?\.linear"
)


@dataclass(frozen=True)
class Quantization:
    """Affine quantization settings: `bits` per weight, one scale and bias per `group_size` weights."""

    bits: int
    group_size: int = 64
    policy: str = "mixed"

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"cannot quantize to {self.bits} bits; use one of {', '.join(map(str, BITS))}.")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group size {self.group_size} is not supported; use one of "
                             f"{', '.join(map(str, GROUP_SIZES))}.")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown quantization policy {self.policy!r}; use one of {', '.join(POLICIES)}.")

    def layer(self, path: str, module: nn.Module) -> bool | dict:
        """False to keep a layer, True to quantize it with these settings, or its own settings (a dict)."""
        if not isinstance(module, nn.Linear) or module.weight.shape[-1] % self.group_size:
            return False
        if self.policy == "mixed" and self.bits < SENSITIVE_BITS and SENSITIVE.fullmatch(path):
            return {"group_size": self.group_size, "bits": SENSITIVE_BITS}
        return True


BYTE_ALIGNED_BITS = (2, 4, 8)  # widths whose packed values never straddle a byte: unpacked by `dequantize_bytes`


def dequantize_bytes(packed: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> mx.array:
    """`mx.dequantize` of affine-quantized float32 weights of 2, 4 or 8 bits, written as byte unpacking and one fused
    multiply-add per group (equal bit for bit): 3-4x faster than MLX's CPU kernel (at 4 bits, 1536 x 6144 in 16 ms
    against 69)."""
    per_byte, mask = 8 // bits, (1 << bits) - 1
    data = packed.view(mx.uint8)
    if per_byte > 1:  # value j of a byte sits in its bits [bits * j, bits * (j + 1)), lowest first
        data = mx.stack([(data >> (bits * j)) & mask for j in range(per_byte)], axis=-1)
    groups = data.reshape(*scales.shape, group_size).astype(scales.dtype)
    return (groups * scales[..., None] + biases[..., None]).reshape(*scales.shape[:-1], -1)


@functools.cache
def _compiled_dequantize(group_size: int, bits: int) -> Callable[[mx.array, mx.array, mx.array], mx.array]:
    """`dequantize_bytes` for these settings, compiled into one pass per step."""
    return mx.compile(functools.partial(dequantize_bytes, group_size=group_size, bits=bits))


_SHARED = threading.local()  # per thread: the float weights of `shared_float_weights`, the flag of `layer_by_layer`


@contextmanager
def shared_float_weights() -> Iterator[None]:
    """While the block builds its graph, each CPU `QuantizedLinear` dequantizes its weight once however often it is
    called (token lanes call each layer once per lane). Evaluate after the block: it holds the weights until then."""
    _SHARED.weights = {}
    try:
        yield
    finally:
        _SHARED.weights = None


@contextmanager
def layer_by_layer() -> Iterator[None]:
    """Within (or around a function it decorates), each CPU `QuantizedLinear` evaluates its output, so its
    dequantized weight is freed before the next layer's is allocated: one layer's float32 weight at a time, for a
    model on one stream. Otherwise most of a model's would be alive at once: MLX's evaluation allocates each
    operation's output when it schedules the operation, about a hundred operations before it runs. Not under
    `mx.compile` or `mx.vmap`, which cannot evaluate."""
    previous = getattr(_SHARED, "evaluate", False)
    _SHARED.evaluate = True
    try:
        yield
    finally:
        _SHARED.evaluate = previous


_BOUNDS_LOCK = threading.Lock()
_BOUNDS = {"open": 0, "limit": 0}  # `schedule_within` bounds open in this process, and the memory limit before them


@contextmanager
def schedule_within(headroom: int) -> Iterator[None]:
    """For models on several streams (token lanes), where evaluating layer by layer would run the streams one after
    the other: within, MLX's evaluation schedules operations ahead only while active memory is within `headroom`
    bytes of its value on entry, past which it waits for scheduled work to finish. Through `mx.set_memory_limit`,
    the guideline MLX's evaluation keeps to (lowered, never raised), so it holds for the whole process (other
    threads' evaluations too); the limit before the first open bound comes back when the last one closes. (On MLX
    builds with a GPU backend the limit also trims the allocator's buffer cache; measured on `mlx[cpu]` only.)"""
    with _BOUNDS_LOCK:
        bound = mx.get_active_memory() + headroom
        current = mx.set_memory_limit(bound)  # not every MLX this library supports has get_memory_limit
        if current < bound:
            mx.set_memory_limit(current)
        if not _BOUNDS["open"]:
            _BOUNDS["limit"] = current
        _BOUNDS["open"] += 1
    try:
        yield
    finally:
        with _BOUNDS_LOCK:
            _BOUNDS["open"] -= 1
            if not _BOUNDS["open"]:
                mx.set_memory_limit(_BOUNDS["limit"])


class QuantizedLinear(nn.QuantizedLinear):
    """MLX's quantized linear layer, except on the CPU backend, whose quantized matmul runs far below its float
    BLAS matmul: there the weight is dequantized just before the matmul and multiplied by the BLAS path (about one
    layer's float32 weight at a time within `layer_by_layer` or `schedule_within`)."""

    def __call__(self, x: mx.array) -> mx.array:
        if mx.default_device() != mx.cpu:
            return super().__call__(x)
        evaluate = getattr(_SHARED, "evaluate", False)  # `layer_by_layer`: the weight dies with this call
        shared = None if evaluate else getattr(_SHARED, "weights", None)
        if shared is None:
            w = self.float_weight()
        elif (w := shared.get(id(self))) is None:
            w = shared[id(self)] = self.float_weight()
        y = mx.addmm(self["bias"], x, w.T) if "bias" in self else x @ w.T
        if evaluate:
            mx.eval(y)
        return y

    def float_weight(self) -> mx.array:
        """The dequantized weight (`dequantize_bytes` where it applies)."""
        biases = self.get("biases")
        if biases is not None and self.bits in BYTE_ALIGNED_BITS and self["scales"].dtype == mx.float32:
            return _compiled_dequantize(self.group_size, self.bits)(self["weight"], self["scales"], biases)
        return mx.dequantize(self["weight"], self["scales"], biases, group_size=self.group_size, bits=self.bits,
                             mode=self.mode)


def quantize_layers(model: nn.Module, group_size: int, bits: int,
                    predicate: Callable[[str, nn.Module], bool | dict]) -> None:
    """`nn.quantize(model, ...)` in place, its quantized linear layers made `QuantizedLinear`s (the same
    parameters, a CPU-fast forward pass)."""
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    for _, module in model.named_modules():
        if type(module) is nn.QuantizedLinear:
            module.__class__ = QuantizedLinear


def quantize_model(model: nn.Module, quantization: Quantization) -> dict:
    """Quantize `model` in place (lazily) and return its config.json "quantization" entry: MLX's convention,
    {"group_size", "bits"} plus {layer path: {"group_size", "bits"}} for layers with other settings."""
    overrides = {}

    def predicate(path: str, module: nn.Module) -> bool | dict:
        settings = quantization.layer(path, module)
        if isinstance(settings, dict):
            overrides[path] = settings
        return settings

    quantize_layers(model, quantization.group_size, quantization.bits, predicate)
    return {"group_size": quantization.group_size, "bits": quantization.bits, **overrides}


def quantized(model: nn.Module, bits: int | None) -> nn.Module:
    """`model` quantized in place to `bits` with the converter's policy, as `load_pipeline(..., quantize=bits)`
    loads it; unchanged when `bits` is None or the model was stored quantized."""
    if bits and not is_quantized(model):
        quantize_model(model, Quantization(bits))
    return model


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of `model` is quantized."""
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for m in model.modules())
