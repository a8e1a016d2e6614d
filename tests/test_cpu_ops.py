"""The CPU backend's elementwise approximations (mlx_flash.cpu_ops) against float64 numpy, within their stated
errors, over the ranges that matter (including saturation)."""

import math

import mlx.core as mx
import numpy as np

from mlx_flash import cpu_ops

X = np.concatenate([np.linspace(-40, 40, 20001), [-1e4, -100.0, 100.0, 1e4]])


def test_exp_below_relative_error():
    top = np.array([[3.0]])
    x = np.linspace(-40, 3, 20001)[None]
    got = np.array(cpu_ops.exp_below(mx.array(x, dtype=mx.float32), mx.array(top, dtype=mx.float32)))
    want = np.exp(np.maximum(x - top, -32.0))
    assert np.max(np.abs(got / want - 1)) < 1e-5


def test_softmax_attention_matches_numpy():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 3, 50, 16)).astype(np.float32) * 3 for _ in range(3))
    got = np.array(cpu_ops.softmax_attention(*map(mx.array, (q, k, v)), scale=0.25))
    s = (q.astype(np.float64) * 0.25) @ k.swapaxes(-1, -2)
    p = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(got, (p / p.sum(-1, keepdims=True)) @ v, rtol=1e-5, atol=1e-5)


def test_gelu():
    x = mx.array(X, dtype=mx.float32)
    gelu = 0.5 * X * (1 + np.tanh(math.sqrt(2 / math.pi) * (X + 0.044715 * X**3)))
    bound = 5e-7 * np.abs(X) + 1e-6  # tanh's absolute error (4e-7) times the |x| / 2 multiplying it, and rounding
    assert np.all(np.abs(np.array(cpu_ops.gelu_approx(x)) - gelu) <= bound)


def test_normalize_silu_and_squared_deviation():
    rng = np.random.default_rng(1)
    x, mean, scale, bias = (rng.normal(size=s).astype(np.float32) for s in ((4, 5, 6), (1, 1, 6), (1, 1, 6), (6,)))
    y = (x.astype(np.float64) - mean) * scale + bias
    args = [mx.array(a) for a in (x, mean, scale, bias)]
    np.testing.assert_allclose(np.array(cpu_ops.normalize_silu(*args)), y / (1 + np.exp(-y)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(cpu_ops.squared_deviation(args[0], args[1])), (x - mean) ** 2, rtol=1e-6)
    np.testing.assert_allclose(np.array(cpu_ops.add3(args[0], args[1], args[3])), x + mean + bias, rtol=1e-6)
