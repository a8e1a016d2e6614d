"""The CPU forward pass of quantized linear layers (dequantize, then the float matmul) against MLX's quantized
matmul, on a model quantized as the converter does and on one loaded from a quantized checkpoint."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_flash.quantization import Quantization, QuantizedLinear, quantize_model
from mlx_flash.weights import quantize_like


def model() -> nn.Module:
    mx.random.seed(0)
    return nn.Sequential(nn.Linear(128, 96), nn.Linear(96, 64, bias=False))


@pytest.mark.parametrize("bits", [4, 8])
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


def test_loaded_quantized_layers_use_the_cpu_path():
    stored = model()
    config = quantize_model(stored, Quantization(4, group_size=32, policy="plain"))
    loaded = quantize_like(model(), dict(tree_flatten(stored.parameters())), config)
    assert all(type(layer) is QuantizedLinear for layer in loaded.layers)
