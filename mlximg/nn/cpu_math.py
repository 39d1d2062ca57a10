"""Faster exp-based ops for MLX's CPU backend in float32: softmax attention, SiLU and SwiGLU.

MLX's CPU exp / sigmoid kernels take ~14 ns per value here (scalar), its multiply-adds 0.35 ns, so the softmax
was most of a denoising step's attention (docs/MEASUREMENTS.md). `exp` below is a degree-7 polynomial in
multiply-adds plus exponent bits, fused by mx.compile where a C++ compiler is present (MLX's CPU JIT calls g++):
~8 ns per value in two vectorised loops, and more accurate than mx.exp here (1e-7 vs 3.9e-6 relative). MLX runs
elementwise kernels on one thread, so large ones are split over one CPU stream per core. Metal and CUDA keep
MLX's own kernels."""

import math
import os
import shutil
import sys
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

from . import dispatch, native

# e^r for |r| <= ln(2) / 2: Taylor coefficients to degree 7 (truncation error < 6e-9 relative).
_EXP_COEFFICIENTS = tuple(1 / math.factorial(n) for n in range(8))
# ln 2 in two parts (Cody-Waite): n * _LN2_HIGH is exact in float32 for the n that occur, so r keeps its digits.
_LN2_HIGH, _LN2_LOW = 0.693359375, -2.12194440e-4
# exp(x) for x below this is 0 in float32 arithmetic anyway; above the upper bound it overflows.
_EXP_RANGE = (-87.0, 88.0)
_ROUNDING = 1.5 * 2**23  # adding and subtracting it rounds a float32 below 2^22 to the nearest integer
_PARALLEL_MIN_VALUES = 1 << 16  # below this, starting the streams costs more than the work
_QUERY_BLOCK = 256  # queries per attention block (256-2048 within 15% at 4128 tokens here)


@lru_cache(maxsize=None)
def _compile(fn):
    """mx.compile where MLX's CPU JIT can build kernels (it runs g++ on Linux); `fn` as is elsewhere."""
    can_jit = sys.platform == "darwin" or shutil.which("g++") is not None
    return mx.compile(fn) if can_jit else fn


@lru_cache(maxsize=None)
def _streams() -> tuple:
    return tuple(mx.new_stream(mx.cpu) for _ in range(min(os.cpu_count() or 1, 8)))


def _parallel(fn, *arrays: mx.array, axis: int = 0) -> mx.array:
    """`fn(*arrays)` for an elementwise `fn`, in slices along `axis` (arrays of size 1 there broadcast), one CPU
    stream per slice, so the cores share work MLX would run on one thread."""
    size = max(a.shape[axis] for a in arrays)
    streams = _streams()[:size]
    if len(streams) < 2 or max(a.size for a in arrays) < _PARALLEL_MIN_VALUES:
        return fn(*arrays)
    bounds = [size * i // len(streams) for i in range(len(streams) + 1)]
    parts = []
    for stream, start, stop in zip(streams, bounds, bounds[1:]):
        index = (slice(None),) * (axis % arrays[0].ndim) + (slice(start, stop),)
        with mx.stream(stream):
            parts.append(fn(*(a if a.shape[axis] == 1 else a[index] for a in arrays)))
    return mx.concatenate(parts, axis=axis)


def _round(x: mx.array) -> mx.array:
    """Nearest integer of x * log2(e), with additions only (mx.floor would end the fused kernel)."""
    return (x * math.log2(math.e) + _ROUNDING) - _ROUNDING


def _exp_mantissa(x: mx.array) -> mx.array:
    """e^r for x = n ln 2 + r, |r| <= ln(2) / 2: a Horner polynomial."""
    x = mx.clip(x, *_EXP_RANGE)
    n = mx.stop_gradient(_round(x))  # n only picks the exponent; gradients flow through r
    r = x - n * _LN2_HIGH - n * _LN2_LOW
    p = _EXP_COEFFICIENTS[-1]
    for c in reversed(_EXP_COEFFICIENTS[:-1]):
        p = p * r + c
    return p


def _exp_exponent_bits(x: mx.array) -> mx.array:
    """The float32 bit pattern of 2^n."""
    return (_round(mx.clip(x, *_EXP_RANGE)).astype(mx.int32) + 127) << 23


def exp(x: mx.array) -> mx.array:
    """e^x = e^r (polynomial) x 2^n (exponent bits). Two kernels that each read x: MLX's compiler fuses each into
    one vectorised loop, where one kernel computing n once for both halves would be split up (2x slower here)."""
    scale = mx.view(mx.stop_gradient(_compile(_exp_exponent_bits)(x)), mx.float32)
    return _compile(_exp_mantissa)(x) * scale


def _silu(x: mx.array) -> mx.array:
    return x / (1 + exp(-x))


def _silu_mul(gate: mx.array, value: mx.array) -> mx.array:
    return _silu(gate) * value


def _silu_in_streams(x: mx.array) -> mx.array:
    return _parallel(_silu, x, axis=1)


def _silu_mul_in_streams(gate: mx.array, value: mx.array) -> mx.array:
    return _parallel(_silu_mul, gate, value, axis=-2)


def _rounded_once(x: mx.array) -> mx.array:
    return nn.silu(x.astype(mx.float32)).astype(x.dtype)


def mlx_silu(x: mx.array) -> mx.array:
    """nn.silu, in half precision computed in float32 and rounded once, as torch's silu is (fused into one kernel
    where MLX compiles: no float32 copy is made)."""
    return nn.silu(x) if x.dtype == mx.float32 else _compile(_rounded_once)(x)


def silu(x: mx.array) -> mx.array:
    """x sigmoid(x), on any device, by the op path dispatch.py picks: the kernel, the polynomial exp, MLX's ops."""
    path = dispatch.op_path(x)
    if path == "mlx":
        return mlx_silu(x)
    return native.silu_mul(x, None, _silu_in_streams) if path == "native" else _silu_in_streams(x)


def silu_mul(gate: mx.array, value: mx.array) -> mx.array:
    """SwiGLU's silu(gate) * value, on any device, chosen as `silu`."""
    path = dispatch.op_path(gate, value)
    if path == "mlx":
        return mlx_silu(gate) * value
    if path == "native" and gate.shape == value.shape:
        return native.silu_mul(gate, value, _silu_mul_in_streams)
    return _silu_mul_in_streams(gate, value)


def _attention_rows(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None,
                    stream) -> mx.array:
    """Attention of a block of queries, `v` with a column of ones appended; the exp runs on `stream`, the matmuls
    on the default stream."""
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if mask is not None and mask.dtype != mx.bool_:
        scores = scores + mask
    elif mask is not None:
        scores = mx.where(mask, scores, -mx.inf)
    row_max = mx.max(scores, axis=-1, keepdims=True)
    with mx.stream(stream):
        weights = exp(scores - row_max)
    if mask is not None and mask.dtype == mx.bool_:
        weights = mx.where(mask, weights, 0.0)
    # v carries a column of ones, so the PV matmul also sums the weights; normalised after it: one divide of
    # (N, D) instead of a pass over (N, N).
    out = weights @ v
    return out[..., :-1] / out[..., -1:]


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None) -> mx.array:
    """softmax(q k^T scale) v on (B, heads, N, D); `mask` boolean (True = attend) or additive, broadcastable to
    (B, heads, N, N_k); masked keys get an exact zero weight.

    Queries go in blocks of _QUERY_BLOCK: the scores of one block at a time (25 MB instead of 400 MB for 6 heads
    x 4128 tokens), and consecutive blocks' exps on different CPU streams, in parallel.
    """
    streams, length = _streams(), q.shape[-2]
    v = mx.concatenate([v, mx.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)
    if length <= _QUERY_BLOCK:
        return _attention_rows(q, k, v, scale, mask, streams[0])
    outputs = []
    for i, start in enumerate(range(0, length, _QUERY_BLOCK)):
        rows = slice(start, start + _QUERY_BLOCK)
        block_mask = mask if mask is None or mask.shape[-2] == 1 else mask[..., rows, :]
        outputs.append(_attention_rows(q[..., rows, :], k, v, scale, block_mask, streams[i % len(streams)]))
    return mx.concatenate(outputs, axis=-2)
