"""The CPU forward pass of quantized linear layers (dequantize, then the float matmul) against MLX's quantized
matmul, on a model quantized as the converter does and on one loaded from a quantized checkpoint."""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_flash.controlnet import ControlNet, ControlNetConfig
from mlx_flash.lanes import cpu_cores
from mlx_flash.memory import largest_layer_bytes
from mlx_flash.mmdit import MMDiT, MMDiTConfig
from mlx_flash.quantization import (
    Quantization, QuantizedLinear, layer_by_layer, quantize_model, shared_float_weights,
)
from mlx_flash.t5 import T5Config, T5Encoder
from mlx_flash.weights import quantize_like


def model() -> nn.Module:
    mx.random.seed(0)
    return nn.Sequential(nn.Linear(128, 96), nn.Linear(96, 64, bias=False))


@pytest.mark.parametrize("by_layer", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cpu_dequantized_matmul_matches_quantized_matmul(bits, by_layer):
    """Also layer by layer, where the first layer's dequantization is split over two CPU streams (2 tokens, 128
    features; the second layer's, 96 features, is not)."""
    m = model()
    quantize_model(m, Quantization(bits, group_size=32, policy="plain"))
    assert all(type(layer) is QuantizedLinear for layer in m.layers)
    x = mx.random.normal((2, 1, 128))
    assert (m.layers[0].splits(x) or cpu_cores() == 1) and not m.layers[1].splits(x[..., :96])
    with mx.stream(mx.cpu), layer_by_layer() if by_layer else nullcontext():
        ours, ref = m(x), x
        for layer in m.layers:
            ref = nn.QuantizedLinear.__call__(layer, ref)
        err = np.abs(np.array(ours) - np.array(ref)).max() / np.abs(np.array(ref)).max()
    print(f"{bits}-bit: max abs error / max |reference| = {err:.2e}")
    assert err < 1e-5


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_cpu_dequantized_weight_is_mlx_dequantize_exactly(bits, group_size):
    """The CPU path's weight (byte unpacking for 2, 4 and 8 bits, MLX's kernel otherwise) equals mx.dequantize's
    bit for bit."""
    mx.random.seed(bits)
    wrapped = nn.Sequential(nn.Linear(256, 48))
    wrapped.layers[0].weight = 3 * wrapped.layers[0].weight + 0.5  # scales and biases well away from 0
    quantize_model(wrapped, Quantization(bits, group_size=group_size, policy="plain"))
    layer = wrapped.layers[0]
    assert type(layer) is QuantizedLinear
    with mx.stream(mx.cpu):
        ours = layer.float_weight()
        ref = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=group_size, bits=bits)
    assert ours.shape == (48, 256)
    assert mx.array_equal(ours, ref).item()


def test_loaded_quantized_layers_use_the_cpu_path():
    stored = model()
    config = quantize_model(stored, Quantization(4, group_size=32, policy="plain"))
    loaded = quantize_like(model(), dict(tree_flatten(stored.parameters())), config)
    assert all(type(layer) is QuantizedLinear for layer in loaded.layers)


def test_shared_float_weights_dequantize_each_layer_once(monkeypatch):
    """Token lanes call each layer once per lane; within `shared_float_weights` its weight is dequantized once."""
    m = model()
    quantize_model(m, Quantization(4, group_size=32, policy="plain"))
    dequantized = []
    float_weight = QuantizedLinear.float_weight
    monkeypatch.setattr(QuantizedLinear, "float_weight", lambda layer: dequantized.append(layer) or float_weight(layer))
    x = mx.random.normal((2, 5, 128))
    with mx.stream(mx.cpu):
        alone = [m(x[:1]), m(x[1:])]
        assert len(dequantized) == 4
        with shared_float_weights(2):
            shared = [m(x[:1]), m(x[1:])]
        assert len(dequantized) == 6
        with layer_by_layer(), shared_float_weights(2):
            by_layer = [m(x[:1]), m(x[1:])]
        assert len(dequantized) == 8
        assert all(mx.array_equal(a, b).item() and mx.array_equal(a, c).item()
                   for a, b, c in zip(alone, shared, by_layer))


def cpu_peak(run: Callable[[], object], bound: Callable[[], AbstractContextManager] = nullcontext) -> int:
    """MLX's peak memory above what is active while the CPU evaluates `run()` within `bound()` (after a warm-up)."""
    with mx.stream(mx.cpu):
        mx.eval(run())
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        with bound():
            mx.eval(run())
        return mx.get_peak_memory() - base


def test_bounds_keep_dequantized_weights_from_piling_up():
    """MLX allocates each output when it schedules the operation, far ahead of the computation: a chain of CPU
    quantized layers on a few tokens holds most of its dequantized weights at once; evaluated layer by layer, one
    (its outputs are tiny), on two lanes too (each layer evaluating both lanes' outputs at the second lane's call)."""
    mx.random.seed(0)
    layers = nn.Sequential(*(nn.Linear(1024, 1024) for _ in range(16)))
    quantize_model(layers, Quantization(4, policy="plain"))
    mx.eval(layers.parameters())
    x = mx.random.normal((2, 4, 1024))
    layer_bytes = 1024 * 1024 * 4

    @contextmanager
    def lanes_by_layer() -> Iterator[None]:
        with layer_by_layer(), shared_float_weights(2):
            yield

    free, by_layer = (cpu_peak(lambda: layers(x), bound) for bound in (nullcontext, layer_by_layer))
    lanes = cpu_peak(lambda: [layers(x[:1]), layers(x[1:])], lanes_by_layer)
    print(f"\npeak above the weights in layers: {free / layer_bytes:.1f} free, {by_layer / layer_bytes:.1f} layer by "
          f"layer, {lanes / layer_bytes:.1f} on two lanes layer by layer")
    assert free >= 6 * layer_bytes
    assert by_layer <= 1.1 * layer_bytes
    assert lanes <= 1.1 * layer_bytes


def quantized_excess(build: Callable[[], nn.Module], run: Callable[[nn.Module], object]) -> float:
    """How far the quantized model's CPU peak lies above the float model's (each above its weights), in bytes."""
    peaks = []
    for quantization in (None, Quantization(4)):
        mx.random.seed(0)
        model = build()
        if quantization:
            quantize_model(model, quantization)
        mx.eval(model.parameters())
        peaks.append(cpu_peak(lambda: run(model)))
    return peaks[1] - peaks[0]


@pytest.mark.parametrize("lanes", [1, 2])
def test_quantized_transformer_step_holds_one_dequantized_layer(monkeypatch, set_lanes, lanes):
    """A quantized MMDiT's CPU step peaks within its largest layer's float32 weight (a dual block's adaLN) of the
    float model's step: its modulation and its blocks evaluate layer by layer, on two lanes both lanes' calls of a
    layer together. Unbounded (`MMDiT.dequantization_bound` a no-op), well over one (1.65-1.82 measured)."""
    set_lanes(lanes)
    config = MMDiTConfig(num_layers=3, num_attention_heads=8, pos_embed_max_size=64, dual_attention_layers=(0,))
    x, t, context, pooled = (mx.random.normal((1, 32, 32, 16)), mx.array([500.0]), mx.random.normal((1, 20, 4096)),
                             mx.random.normal((1, 2048)))
    largest = largest_layer_bytes(MMDiT(config))

    def excess() -> float:
        return quantized_excess(lambda: MMDiT(config), lambda model: model(x, t, context, pooled)) / largest

    bounded = excess()
    monkeypatch.setattr(MMDiT, "dequantization_bound", lambda model: nullcontext())
    unbounded = excess()
    print(f"\n{lanes} lane(s): step peak above the float step's, in largest layers: {bounded:.2f} bounded, "
          f"{unbounded:.2f} not")
    assert bounded <= 1
    assert unbounded >= 1.3


def single_stream_model(name: str) -> tuple[Callable[[], nn.Module], tuple]:
    """A tiny T5 or ControlNet and the inputs of a forward pass."""
    if name == "t5":
        config = T5Config(vocab_size=100, d_model=256, d_kv=32, num_heads=8, d_ff=2048, num_layers=4)
        return lambda: T5Encoder(config), (mx.random.randint(0, 100, (1, 32)),)
    config = ControlNetConfig(num_layers=4, num_attention_heads=8, pos_embed_max_size=64)
    return lambda: ControlNet(config), (mx.random.normal((1, 16, 16, 16)), mx.random.normal((1, 16, 16, 16)),
                                        mx.array([500.0]), mx.random.normal((1, 2048)), mx.random.normal((1, 20, 4096)))


@pytest.mark.parametrize("name", ["t5", "controlnet"])
def test_single_stream_models_hold_one_dequantized_layer(name):
    """A quantized T5's or ControlNet's CPU forward pass, evaluated layer by layer, peaks within its largest layer's
    float32 weight of the float model's; without `layer_by_layer` (the forward pass undecorated), several."""
    build, inputs = single_stream_model(name)
    largest = largest_layer_bytes(build())
    by_layer = quantized_excess(build, lambda model: model(*inputs)) / largest
    free = quantized_excess(build, lambda model: type(model).__call__.__wrapped__(model, *inputs)) / largest
    print(f"\n{name} peak above the float model's, in largest layers: {by_layer:.2f} layer by layer, {free:.2f} not")
    assert by_layer <= 1
    assert free >= 2.5
