"""Elementwise functions for MLX's CPU backend, whose transcendental functions (exp, tanh) run element by element
far below memory speed: here made of multiply-adds and one division, which `mx.compile` fuses into one loop.

tanh is a clamped odd rational function of degree 13 / 6 (the classic float32 fit; max absolute error
4e-7 over the reals); SiLU and the tanh-approximated GELU are built on it. The softmax's exp of non-positive
numbers is a polynomial on [-1, 0] squared five times (relative error < 1e-5; exp(-32) = 1e-14 stands
for anything smaller). Inputs are computed in float32."""

from __future__ import annotations

import math

import mlx.core as mx

TANH_CLAMP = 7.90531110763549805  # float32 tanh is 1 - 2^-24 or closer beyond
TANH_P = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
          -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16)  # of x, x^3, ..., x^13
TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)  # of 1, ..., x^6
GELU_C = math.sqrt(2 / math.pi)
EXP_SQUARINGS = 5  # exp(x) = exp(x / 32) ** 32 for x in [-32, 0]
# exp on [-1, 0]: its degree-7 Chebyshev fit in the monomial basis, relative error < 1.3e-9 (Taylor needs degree 10)
EXP_POLY = (0.999999999524568, 0.9999999386845216, 0.49999869979111194, 0.16665612862919205, 0.041624501797122695,
            0.008240864778766344, 0.0012744585401814777, 0.00012128683881506227)


def on_cpu() -> bool:
    """Whether MLX computes on its CPU backend."""
    return mx.default_device() == mx.cpu


def fast_path(x: mx.array) -> bool:
    """Whether the functions here replace MLX's for x: float32 on the CPU backend (half precision keeps MLX's)."""
    return on_cpu() and x.dtype == mx.float32


def _horner(coefficients: tuple[float, ...], x: mx.array) -> mx.array:
    result = coefficients[-1]
    for c in coefficients[-2::-1]:
        result = result * x + c
    return result


def tanh(x: mx.array) -> mx.array:
    """tanh of a float32 array (not compiled by itself: call it inside a compiled function)."""
    x = mx.clip(x, -TANH_CLAMP, TANH_CLAMP)
    x2 = x * x
    return x * _horner(TANH_P, x2) / _horner(TANH_Q, x2)


@mx.compile
def exp_below(x: mx.array, top: mx.array) -> mx.array:
    """exp(x - top) for finite x <= top (broadcast), float32: the numerators of a softmax."""
    a = x.astype(mx.float32) - top
    # max(a, -32) without a branch (MLX's maximum tests for NaN, which keeps the compiler from vectorizing the
    # loop): m + |m| is exactly 0 for m = -32 - a <= 0
    m = -(2.0**EXP_SQUARINGS) - a
    y = (a + 0.5 * (m + mx.abs(m))) * 2.0**-EXP_SQUARINGS
    y = _horner(EXP_POLY, y)
    for _ in range(EXP_SQUARINGS):
        y = y * y
    return y


def softmax_attention(q: mx.array, k: mx.array, v: mx.array, *, scale: float) -> mx.array:
    """softmax(q k^T * scale) v for float32 (..., tokens, head_dim) arrays, the exponentials from `exp_below`.
    The scores are computed transposed, (keys, queries), so that their maximum over the keys runs down contiguous
    rows (MLX's CPU reduction along a contiguous last axis is element by element, 5x slower); the softmax's sums
    come out of the product with v as its extra column of ones, saving a pass over the scores."""
    scores_t = k @ (q * scale).swapaxes(-1, -2)
    p = exp_below(scores_t, scores_t.max(axis=-2, keepdims=True)).swapaxes(-1, -2)
    out = p @ mx.concatenate([v, mx.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)
    return out[..., :-1] / out[..., -1:]


@mx.compile
def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x), sigmoid(x) = (1 + tanh(x / 2)) / 2."""
    y = x.astype(mx.float32)
    return (y * (0.5 + 0.5 * tanh(0.5 * y))).astype(x.dtype)


@mx.compile
def gelu_approx(x: mx.array) -> mx.array:
    """GELU with the tanh approximation, as `nn.gelu_approx`."""
    y = x.astype(mx.float32)
    return (0.5 * y * (1 + tanh(GELU_C * (y + 0.044715 * y * y * y)))).astype(x.dtype)


@mx.compile
def normalize_silu(x: mx.array, mean: mx.array, scale: mx.array, bias: mx.array) -> mx.array:
    """silu((x - mean) * scale + bias) in float32 (broadcast statistics and affine parameters), one pass."""
    y = (x.astype(mx.float32) - mean) * scale + bias
    return y * (0.5 + 0.5 * tanh(0.5 * y))


@mx.compile
def normalize(x: mx.array, mean: mx.array, scale: mx.array, bias: mx.array) -> mx.array:
    """(x - mean) * scale + bias in float32, one pass."""
    return (x.astype(mx.float32) - mean) * scale + bias


@mx.compile
def squared_deviation(x: mx.array, mean: mx.array) -> mx.array:
    """(x - mean)^2 (broadcast mean), one pass."""
    d = x - mean
    return d * d


@mx.compile
def add3(x: mx.array, y: mx.array, z: mx.array) -> mx.array:
    """x + y + z (broadcast), one pass."""
    return x + y + z
