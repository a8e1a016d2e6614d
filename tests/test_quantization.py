"""The CPU forward pass of quantized linear layers (dequantize, then the float matmul) against MLX's quantized
matmul, on a model quantized as the converter does and on one loaded from a quantized checkpoint."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_flash.quantization import Quantization, QuantizedLinear, quantize_model, shared_float_weights
from mlx_flash.weights import quantize_like


def model() -> nn.Module:
    mx.random.seed(0)
    return nn.Sequential(nn.Linear(128, 96), nn.Linear(96, 64, bias=False))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cpu_dequantized_matmul_matches_quantized_matmul(bits):
    m = model()
    quantize_model(m, Quantization(bits, group_size=32, policy="plain"))
    assert all(type(layer) is QuantizedLinear for layer in m.layers)
    x = mx.random.normal((2, 5, 128))
    with mx.stream(mx.cpu):
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
        with shared_float_weights():
            shared = [m(x[:1]), m(x[1:])]
        assert len(dequantized) == 6
        assert all(mx.array_equal(a, b).item() for a, b in zip(alone, shared))
