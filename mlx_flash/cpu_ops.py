"""Elementwise functions for MLX's CPU backend, whose transcendental functions (exp, tanh) run element by element
far below memory speed: here made of multiply-adds and one division, which `mx.compile` fuses into one or two loops.

tanh is a clamped odd rational function of degree 13 / 6 (the classic float32 fit; max absolute error
4e-7 over the reals); SiLU and the tanh-approximated GELU are built on it. The softmax's exp of non-positive
numbers is a polynomial on [-1, 0] squared five times (relative error < 1e-5; exp(-32) = 1e-14 stands
for anything smaller). Inputs are computed in float32.

MLX's compiler fuses a chain at most 11 operations deep (its max_compile_depth). A deeper chain is cut into
kernels whose inputs include broadcast constants, and these run MLX's strided loop, element by element: the
GELU built on a tanh by Horner's rule took 3.8x the time it takes now (benchmarks/results/cpu.md, session 16).
So each compiled function here stays within that depth: polynomials by Estrin's scheme (depth 2 per doubling of
the degree), and a function too deep for one kernel in two, the first writing the contiguous array the second
reads. The exp's clamp is made of absolute values: MLX's maximum tests for NaN, which keeps the compiler from
vectorizing a loop."""

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


def _estrin(coefficients: tuple[float, ...], x: mx.array) -> mx.array:
    """sum(c_i x^i) by Estrin's scheme: pairs c_2i + c_2i+1 x, then pairs of those in x^2, x^4, ...
    (depth 2 log2(degree + 1), against Horner's 2 degree)."""
    terms = [coefficients[i] + coefficients[i + 1] * x if i + 1 < len(coefficients) else coefficients[i]
             for i in range(0, len(coefficients), 2)]
    power = x * x
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] * power if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
        power = power * power
    return terms[0]


def _clamp(x: mx.array, bound: float) -> mx.array:
    """x clipped to [-bound, bound] (in a short kernel of its own, where the NaN tests cost little)."""
    return mx.minimum(mx.maximum(x, -bound), bound)


@mx.compile
def _half_one_plus_tanh(y: mx.array, u: mx.array) -> mx.array:
    """y (1 + tanh(u)) / 2 for u within the tanh clamp: depth 11."""
    z = u * u
    return (0.5 * y) * (1 + u * _estrin(TANH_P, z) / _estrin(TANH_Q, z))


@mx.compile
def _exp_numerators(x: mx.array, top: mx.array) -> mx.array:
    """exp(max((x - top) / 32, -1)) for finite x <= top: depth 10. With e = (x - top) / 64, |e + 1/2| + e - 1/2
    is 2e down to -1/2 and -1 below."""
    e = x * 2.0 ** -(EXP_SQUARINGS + 1) - top * 2.0 ** -(EXP_SQUARINGS + 1)
    return _estrin(EXP_POLY, mx.abs(e + 0.5) + (e - 0.5))


@mx.compile
def _squarings(y: mx.array) -> mx.array:
    for _ in range(EXP_SQUARINGS):
        y = y * y
    return y


def exp_below(x: mx.array, top: mx.array) -> mx.array:
    """exp(x - top) for finite float32 x <= top (broadcast): the numerators of a softmax."""
    return _squarings(_exp_numerators(x, top))


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
def _gelu_argument(x: mx.array) -> mx.array:
    return _clamp(x * (GELU_C + GELU_C * 0.044715 * (x * x)), TANH_CLAMP)


def gelu_approx(x: mx.array) -> mx.array:
    """GELU with the tanh approximation, as `nn.gelu_approx`, for float32 x."""
    return _half_one_plus_tanh(x, _gelu_argument(x))


@mx.compile
def _normalize_with_silu_argument(x: mx.array, mean: mx.array, scale: mx.array, bias: mx.array
                                  ) -> tuple[mx.array, mx.array]:
    y = (x.astype(mx.float32) - mean) * scale + bias
    return y, _clamp(0.5 * y, TANH_CLAMP)


def normalize_silu(x: mx.array, mean: mx.array, scale: mx.array, bias: mx.array) -> mx.array:
    """silu((x - mean) * scale + bias) in float32 (broadcast statistics and affine parameters)."""
    return _half_one_plus_tanh(*_normalize_with_silu_argument(x, mean, scale, bias))


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
