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

from .lanes import cpu_cores, cpu_streams

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


ALIGNED_BITS = (2, 4, 8)  # widths whose packed values never straddle a byte (nor a word): `dequantize_aligned`


def dequantize_aligned(packed: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> mx.array:
    """`mx.dequantize` of affine-quantized float32 weights of 2, 4 or 8 bits as element-wise work (equal bit for bit):
    8 bits read as bytes, 2 and 4 shifted out of each uint32 word (value j in bits [bits * j, bits * (j + 1))),
    then one multiply-add per group. Compiled it is one pass that writes only the weight, 2-3x faster than MLX's
    CPU kernel (1536 x 6144 on a Xeon: 10.7 ms at 4 bits, 7.3 at 8, against 24.3 and 22.2; 4x on an EPYC)."""
    if bits == 8:
        values = packed.view(mx.uint8).reshape(*scales.shape, group_size)
        scale, bias = scales[..., None], biases[..., None]
    else:
        words = packed.reshape(*scales.shape, group_size * bits // 32, 1)
        values = (words >> mx.arange(0, 32, bits, dtype=mx.uint32)) & ((1 << bits) - 1)
        scale, bias = scales[..., None, None], biases[..., None, None]
    return (values.astype(scales.dtype) * scale + bias).reshape(*scales.shape[:-1], -1)


@functools.cache
def _compiled_dequantize(group_size: int, bits: int) -> Callable[[mx.array, mx.array, mx.array], mx.array]:
    """`dequantize_aligned` for these settings, compiled."""
    return mx.compile(functools.partial(dequantize_aligned, group_size=group_size, bits=bits))


# Evaluating layer by layer on one stream, a CPU layer whose tokens are at most this fraction of its input features
# dequantizes its weight in two halves of its output features, each on its own CPU stream (both cores), and joins
# the halves' outputs: the dequantization is then most of the layer's time. SD3.5 Medium's 4-bit adaLN modulation
# (one token): 0.95 -> 0.62-0.76 s a step; four 4-bit T5-XXL layers at 256 tokens (1/16): 2.97 -> 3.05 s, not there.
SPLIT_TOKENS_PER_FEATURE = 1 / 64

_SHARED = threading.local()  # per thread: the layers of `shared_float_weights`, the flag of `layer_by_layer`


@contextmanager
def shared_float_weights(calls: int) -> Iterator[None]:
    """While a block builds its graph on token lanes, which call each layer `calls` times (once per lane), each
    CPU `QuantizedLinear` dequantizes its weight once for all of them. Within `layer_by_layer`, a layer evaluates
    its `calls` outputs together at its last call, so the lanes run side by side up to it and its weight is freed
    before the next layer's is allocated; otherwise evaluate after the block, which holds every weight until then."""
    _SHARED.layers, _SHARED.calls = {}, calls
    try:
        yield
    finally:
        _SHARED.layers = None


@contextmanager
def layer_by_layer() -> Iterator[None]:
    """Within (or around a function it decorates), each CPU `QuantizedLinear` evaluates its output (on token lanes,
    its lanes' outputs: `shared_float_weights`), so its dequantized weight is freed before the next layer's is
    allocated: one layer's float32 weight at a time. Otherwise most of a model's would be alive at once: MLX's
    evaluation allocates each operation's output when it schedules the operation, about a hundred operations before
    it runs. Not under `mx.compile` or `mx.vmap`, which cannot evaluate."""
    previous = getattr(_SHARED, "evaluate", False)
    _SHARED.evaluate = True
    try:
        yield
    finally:
        _SHARED.evaluate = previous


class QuantizedLinear(nn.QuantizedLinear):
    """MLX's quantized linear layer, except on the CPU backend, whose quantized matmul runs far below its float
    BLAS matmul: there the weight is dequantized just before the matmul and multiplied by the BLAS path (about one
    layer's float32 weight at a time within `layer_by_layer`)."""

    def __call__(self, x: mx.array) -> mx.array:
        if mx.default_device() != mx.cpu:
            return super().__call__(x)
        evaluate = getattr(_SHARED, "evaluate", False)
        shared = getattr(_SHARED, "layers", None)
        if shared is None:
            y = self.split_matmul(x) if evaluate and self.splits(x) else self.float_matmul(x, self.float_weight())
            if evaluate:
                mx.eval(y)  # the weight dies with this call
            return y
        if (layer := shared.get(id(self))) is None:
            layer = shared[id(self)] = (self.float_weight(), [])
        weight, outputs = layer
        y = self.float_matmul(x, weight)
        if evaluate:
            outputs.append(y)
            if len(outputs) == _SHARED.calls:
                del shared[id(self)]
                mx.eval(outputs)  # every lane's output: the weight dies with the last lane's call
        return y

    def splits(self, x: mx.array) -> bool:
        """Whether `split_matmul` computes this layer's output for `x` (SPLIT_TOKENS_PER_FEATURE)."""
        features = x.shape[-1]
        return x.size // features <= SPLIT_TOKENS_PER_FEATURE * features and cpu_cores() > 1

    def split_matmul(self, x: mx.array) -> mx.array:
        """The output in two halves of the output features, each half's weight dequantized on its own CPU stream."""
        half = self["weight"].shape[0] // 2
        halves = []
        for rows, stream in zip((slice(0, half), slice(half, None)), cpu_streams(2)):
            with mx.stream(stream):
                weight = self.float_weight(rows)
            halves.append(self.float_matmul(x, weight, rows))
        return mx.concatenate(halves, axis=-1)

    def float_matmul(self, x: mx.array, weight: mx.array, rows: slice = slice(None)) -> mx.array:
        """The output features `rows` of the layer from their dequantized `weight`."""
        return mx.addmm(self["bias"][rows], x, weight.T) if "bias" in self else x @ weight.T

    def float_weight(self, rows: slice = slice(None)) -> mx.array:
        """The dequantized weight of the output features `rows` (`dequantize_aligned` where it applies)."""
        packed, scales, biases = self["weight"][rows], self["scales"][rows], self.get("biases")
        biases = None if biases is None else biases[rows]
        if biases is not None and self.bits in ALIGNED_BITS and scales.dtype == mx.float32:
            return _compiled_dequantize(self.group_size, self.bits)(packed, scales, biases)
        return mx.dequantize(packed, scales, biases, group_size=self.group_size, bits=self.bits, mode=self.mode)


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
