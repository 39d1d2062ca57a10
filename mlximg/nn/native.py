"""Compiled float32 kernels for MLX's CPU backend (cpu_kernels.cpp): softmax attention, SiLU / SwiGLU, the
attention heads' RMSNorm + RoPE, the blocks' norm + adaLN modulation + gated residual, and the VAE's 3x3
convolutions and GroupNorm (+ SiLU).

MLX has no fused CPU attention (its graph writes the N x N scores several times) and its CPU exp is scalar, so
attention and SwiGLU were most of a denoising step's non-matmul time here. The attention kernel keeps MLX's BLAS
for the two matmuls and does the softmax in one vectorised pass over cache-sized blocks (4-5x MLX's sdpa, 1.2-1.4x
torch's fused CPU attention, docs/MEASUREMENTS.md); the convolution unfolds bands of rows into a cache-sized
buffer for one BLAS matmul each (MLX's CPU conv2d unfolds the whole input); the others are one vectorised pass
each. The library is compiled with g++ (which MLX's own CPU compiler also calls) into a cache folder keyed by the
source and compiler, and used on Linux when mlximg preloaded OpenBLAS (whose cblas_sgemm the attention and
convolution kernels call). Where any of that is missing, `applies` is False and callers keep their MLX ops;
`status()` says why. Whether an op uses them is decided in dispatch.py (MLXIMG_OPS).

The kernels run outside MLX's graph: their inputs are evaluated first (a host synchronisation, harmless on the
CPU, whose work runs in order anyway) and the result is a new array. Gradients come from the caller's MLX version
of the same function (a custom_function vjp), so training through them stays exact.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..runtime import blas

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
_FLAGS = ("-std=c++17", "-O3", "-fPIC", "-shared", "-Wall", "-Wno-psabi")
_LANES = 8  # the kernel's vector width: key masks are padded to a multiple of it
_Strides = ctypes.c_int64 * 3

_reason = {"text": "not attempted"}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlximg" / "native"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _build(compiler: str) -> Path:
    """The compiled library, from the cache or built now (written to a temporary name, then renamed into place)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(_FLAGS).encode() + version.encode()).hexdigest()[:16]
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"cpu_kernels-{key}.so"
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            built = Path(scratch) / target.name
            result = subprocess.run([compiler, *_FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
            os.replace(built, target)
    return target


@dataclass(frozen=True)
class _Library:
    attention: ctypes._CFuncPtr
    silu_mul: ctypes._CFuncPtr
    rms_norm_rope: ctypes._CFuncPtr
    conv3x3: ctypes._CFuncPtr
    group_norm: ctypes._CFuncPtr
    norm_modulate: ctypes._CFuncPtr
    sgemm: int  # cblas_sgemm's address in the OpenBLAS mlximg loaded


def _bind(path: Path, openblas: str) -> _Library:
    library = ctypes.CDLL(str(path))
    attention = library.attention_f32
    attention.restype = ctypes.c_int
    attention.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 6 + [_Strides] * 4 + [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float]
    silu_mul = library.silu_mul_f32
    silu_mul.restype = None
    silu_mul.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                         ctypes.c_int64, ctypes.c_int64]
    rms_norm_rope = library.rms_norm_rope_f32
    rms_norm_rope.restype = None
    rms_norm_rope.argtypes = [ctypes.c_void_p, _Strides, ctypes.c_void_p, ctypes.c_float] + [ctypes.c_void_p] * 2 + [
        ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int] * 4
    conv3x3 = library.conv3x3_f32
    conv3x3.restype = ctypes.c_int
    conv3x3.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 5
    group_norm = library.group_norm_f32
    group_norm.restype = ctypes.c_int
    group_norm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                                                   ctypes.c_float, ctypes.c_int]
    norm_modulate = library.norm_modulate_f32
    norm_modulate.restype = None
    norm_modulate.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 2 + [ctypes.c_int] * 2 + [ctypes.c_float]
    sgemm = ctypes.cast(ctypes.CDLL(openblas).cblas_sgemm, ctypes.c_void_p).value
    return _Library(attention, silu_mul, rms_norm_rope, conv3x3, group_norm, norm_modulate, sgemm)


@lru_cache(maxsize=None)
def _library() -> _Library | None:
    """The bound library, or None with the reason kept for `status`."""
    openblas = blas.preload_system_blas()
    if not sys.platform.startswith("linux") or openblas is None:
        _reason["text"] = "needs Linux with mlximg's OpenBLAS (" + blas.blas_status() + ")"
        return None
    if (compiler := _compiler()) is None:
        _reason["text"] = "no C++ compiler (g++, or $CXX) found"
        return None
    try:
        library = _bind(_build(compiler), openblas)
    except (OSError, RuntimeError) as error:
        _reason["text"] = f"building the kernels failed: {error}"
        return None
    _reason["text"] = f"built in {cache_dir()}"
    return library


def built() -> bool:
    """Whether the kernels are built (and can be called) on this machine."""
    return _library() is not None


def applies(*arrays: mx.array) -> bool:
    """Whether the kernels can run on these arrays: float32 on the CPU, with the library built."""
    return mx.default_device() == mx.cpu and all(a.dtype == mx.float32 for a in arrays) and built()


def status() -> str:
    """Whether the kernels are in use, in words."""
    return ("in use: " if _library() else "not used: ") + _reason["text"]


def _host_view(a: mx.array) -> np.ndarray:
    """A NumPy view of an evaluated array (a copy only if its last axis is not contiguous)."""
    view = np.array(a, copy=False)
    return view if view.strides[-1] == view.itemsize else np.ascontiguousarray(view)


def _host_contiguous(a: mx.array) -> np.ndarray:
    return np.ascontiguousarray(np.array(a, copy=False))


def _output(shape: tuple[int, ...]) -> tuple[mx.array, np.ndarray]:
    """A new float32 array and a writable NumPy view of it for a kernel to fill. Its memory comes from MLX's
    buffer cache; fresh NumPy memory of this size is mapped from the OS each time and page-faults (5x slower)."""
    out = mx.zeros(shape, mx.float32)
    mx.eval(out)
    return out, np.array(out, copy=False)


def _element_strides(a: np.ndarray) -> ctypes.Array:
    return _Strides(*(s // a.itemsize for s in a.strides[:3]))


def _with_gradients_of(differentiable, forward):
    """`forward` as an MLX function whose vjp is `differentiable`'s."""
    kernel = mx.custom_function(forward)

    @kernel.vjp
    def kernel_vjp(primals, cotangent, _):
        primals = list(primals) if isinstance(primals, (tuple, list)) else [primals]  # one input comes bare
        gradients = mx.vjp(differentiable, primals, [cotangent])[1]
        return tuple(gradients) if len(gradients) > 1 else gradients[0]

    return kernel


def _key_valid(mask: mx.array | None, batch: int, keys: int) -> np.ndarray | None:
    """A boolean key mask (B or 1, 1, 1, N_k) as (B or 1, N_k padded to the vector width) floats of 0 / 1."""
    if mask is None:
        return None
    rows = np.array(mask).reshape(mask.shape[0], keys)
    valid = np.zeros((rows.shape[0], -(-keys // _LANES) * _LANES), np.float32)
    valid[:, :keys] = rows
    return valid


def supports_attention(q: mx.array, k: mx.array, v: mx.array, key_mask: mx.array | None) -> bool:
    """Whether `attention` can take these inputs: (B, H, N, D) with H a multiple of k's and v's heads, and at most
    one boolean key mask (B or 1, 1, 1, N_k) for all queries."""
    key_mask_fits = key_mask is None or (key_mask.dtype == mx.bool_ and key_mask.ndim == 4
                                         and key_mask.shape[1:3] == (1, 1) and key_mask.shape[-1] == k.shape[-2])
    grouped = all(a.ndim == 4 for a in (q, k, v)) and k.shape[:2] == v.shape[:2] and q.shape[1] % k.shape[1] == 0
    return key_mask_fits and grouped and applies(q, k, v)


def _forward(q: mx.array, k: mx.array, v: mx.array, scale: float, key_mask: mx.array | None,
             causal: bool) -> mx.array:
    library = _library()
    mx.eval(q, k, v)
    qn, kn, vn = (_host_view(a) for a in (q, k, v))
    batch, heads, length, head_dim = qn.shape
    result, out = _output((batch, length, heads * head_dim))
    valid = _key_valid(key_mask, batch, kn.shape[2])
    valid_stride = 0 if valid is None or valid.shape[0] == 1 else valid.shape[1]
    code = library.attention(
        library.sgemm, qn.ctypes.data, kn.ctypes.data, vn.ctypes.data, out.ctypes.data, batch, heads, kn.shape[1],
        length, kn.shape[2], head_dim, _element_strides(qn), _element_strides(kn), _element_strides(vn),
        _Strides(length * heads * head_dim, head_dim, heads * head_dim), None if valid is None else valid.ctypes.data,
        valid_stride, int(causal), scale)
    if code != 0:
        raise MemoryError("the CPU attention kernel could not allocate its score block")
    return result


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, key_mask: mx.array | None, differentiable,
              causal: bool = False) -> mx.array:
    """softmax(q k^T scale) v of (B, heads, N, D) inputs as (B, N, heads * D), by the kernel (call
    `supports_attention` first); `causal` as MLX's "causal" mask, on top of `key_mask`. Its gradients are those of
    `differentiable(q, k, v)`, the same attention in MLX ops."""
    return _with_gradients_of(differentiable, lambda q, k, v: _forward(q, k, v, scale, key_mask, causal))(q, k, v)


def _host_rows(a: mx.array) -> tuple[np.ndarray, int]:
    """An evaluated array as a host view and the element stride between its rows (last-axis vectors): a view
    where rows are evenly spaced (column slices of a matrix, such as split projections), else a copy."""
    view = _host_view(a)
    if view.ndim == 1:
        return view, view.shape[0]
    row = view.strides[-2] // view.itemsize
    even = all(view.strides[i] == view.strides[i + 1] * view.shape[i + 1] for i in range(view.ndim - 2))
    if view.strides[-2] % view.itemsize or not even:
        view = np.ascontiguousarray(view)
        row = view.shape[-1]
    return view, row


def _silu_mul_forward(gate: mx.array, value: mx.array | None) -> mx.array:
    mx.eval(*(a for a in (gate, value) if a is not None))
    gate_host, gate_row = _host_rows(gate)
    value_host, value_row = (None, 0) if value is None else _host_rows(value)
    result, out = _output(gate_host.shape)
    cols = gate_host.shape[-1]
    _library().silu_mul(gate_host.ctypes.data, gate_row, None if value is None else value_host.ctypes.data,
                        value_row, out.ctypes.data, out.size // max(cols, 1), cols)
    return result


def silu_mul(gate: mx.array, value: mx.array | None, differentiable) -> mx.array:
    """silu(gate) * value, or silu(gate) where value is None, by the kernel (call `applies` first; same shapes).
    Its gradients are those of `differentiable(gate[, value])`."""
    if value is None:
        return _with_gradients_of(differentiable, lambda gate: _silu_mul_forward(gate, None))(gate)
    return _with_gradients_of(differentiable, _silu_mul_forward)(gate, value)


def supports_norm_rope(x: mx.array, cos: mx.array) -> bool:
    """Whether `rms_norm_rope` can take x (B, N, heads, D) and tables (B or 1, 1, N, D / 2)."""
    batch, length, _, head_dim = x.shape
    return (cos.ndim == 4 and cos.shape[0] in (1, batch) and cos.shape[1:] == (1, length, head_dim // 2)
            and head_dim % 2 == 0 and applies(x, cos))


def _norm_rope_forward(x: mx.array, weight: mx.array | None, eps: float, cos: mx.array, sin: mx.array) -> mx.array:
    mx.eval(*(a for a in (x, weight, cos, sin) if a is not None))
    host = np.array(x, copy=False)
    batch, length, heads, head_dim = host.shape
    if host.strides[2:] != (head_dim * 4, 4):  # head rows must be contiguous and side by side
        host = np.ascontiguousarray(host)
    cos_host, sin_host = _host_contiguous(cos), _host_contiguous(sin)
    weight_host = None if weight is None else _host_contiguous(weight)
    result, out = _output(host.shape)
    _library().rms_norm_rope(
        host.ctypes.data, _element_strides(host),
        None if weight_host is None else weight_host.ctypes.data, eps, cos_host.ctypes.data, sin_host.ctypes.data,
        0 if cos_host.shape[0] == 1 else length * head_dim // 2, out.ctypes.data, batch, length, heads, head_dim)
    return result


def rms_norm_rope(x: mx.array, weight: mx.array | None, eps: float, cos: mx.array, sin: mx.array,
                  differentiable) -> mx.array:
    """RMSNorm (x / rms * weight; none where weight is None) then RoPE of x (B, N, heads, D), in that layout, by
    the kernel (call `supports_norm_rope` first). Gradients for x and weight are `differentiable(x[, weight])`'s."""
    if weight is None:
        return _with_gradients_of(differentiable, lambda x: _norm_rope_forward(x, None, eps, cos, sin))(x)
    return _with_gradients_of(differentiable, lambda x, w: _norm_rope_forward(x, w, eps, cos, sin))(x, weight)


def _conv3x3_forward(x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
    mx.eval(x, weight, bias)
    x_host, weight_host, bias_host = (_host_contiguous(a) for a in (x, weight, bias))
    batch, height, width, c_in = x_host.shape
    result, out = _output((batch, height, width, weight.shape[0]))
    library = _library()
    code = library.conv3x3(library.sgemm, x_host.ctypes.data, weight_host.ctypes.data, bias_host.ctypes.data,
                           out.ctypes.data, batch, height, width, c_in, weight.shape[0])
    if code != 0:
        raise MemoryError("the CPU convolution kernel could not allocate its unfolded band")
    return result


def conv3x3(x: mx.array, weight: mx.array, bias: mx.array, differentiable) -> mx.array:
    """A 3x3 convolution, stride 1, zero padding 1, of x (B, H, W, C_in) by weight (C_out, 3, 3, C_in) plus bias
    (C_out,), by the kernel (call `applies` first). Gradients are `differentiable(x, weight, bias)`'s."""
    return _with_gradients_of(differentiable, _conv3x3_forward)(x, weight, bias)


def _group_norm_forward(x: mx.array, weight: mx.array, bias: mx.array, groups: int, eps: float,
                        silu: bool) -> mx.array:
    mx.eval(x, weight, bias)
    x_host, weight_host, bias_host = (_host_contiguous(a) for a in (x, weight, bias))
    result, out = _output(x_host.shape)
    code = _library().group_norm(x_host.ctypes.data, weight_host.ctypes.data, bias_host.ctypes.data,
                                 out.ctypes.data, x_host.shape[0], x_host[0, ..., 0].size, x_host.shape[-1], groups,
                                 eps, int(silu))
    if code != 0:
        raise MemoryError("the CPU GroupNorm kernel could not allocate its statistics")
    return result


def group_norm(x: mx.array, weight: mx.array, bias: mx.array, groups: int, eps: float, silu: bool,
               differentiable) -> mx.array:
    """GroupNorm of x (B, ..., C) over everything but the batch and channel groups, times weight plus bias (C,),
    then SiLU if `silu`, by the kernel (call `applies` first). Gradients are `differentiable(x, weight, bias)`'s."""
    return _with_gradients_of(differentiable, lambda x, w, b: _group_norm_forward(x, w, b, groups, eps, silu))(
        x, weight, bias)


NORMS = {"none": 0, "rms": 1, "layer": 2}
_MODULATION_INPUTS = ("weight", "scale", "shift", "residual", "gate")


def supports_norm_modulate(x: mx.array, **inputs) -> bool:
    """Whether `norm_modulate` can take x (B, N, D) and these inputs: weight (D,), residual like x, and per-sample
    scale / shift / gate (B or 1, 1, D)."""
    if x.ndim != 3:
        return False
    batch, _, dim = x.shape
    fits = {"weight": lambda a: a.shape == (dim,), "residual": lambda a: a.shape == x.shape}
    per_sample = lambda a: a.ndim == 3 and a.shape[0] in (1, batch) and a.shape[1:] == (1, dim)  # noqa: E731
    return all(fits.get(name, per_sample)(a) for name, a in inputs.items()) and applies(x, *inputs.values())


def _norm_modulate_forward(x: mx.array, inputs: dict, norm: str, eps: float) -> mx.array:
    mx.eval(x, *inputs.values())
    batch, length, dim = x.shape
    host = {"x": _host_contiguous(x)}
    for name, a in inputs.items():
        a = _host_contiguous(a)
        per_sample = name in ("scale", "shift", "gate")
        host[name] = np.ascontiguousarray(np.broadcast_to(a, (batch, 1, dim))) if per_sample else a
    result, out = _output(x.shape)
    pointer = lambda name: host[name].ctypes.data if name in host else None  # noqa: E731
    _library().norm_modulate(pointer("x"), *(pointer(name) for name in _MODULATION_INPUTS), out.ctypes.data,
                             batch * length, length, dim, NORMS[norm], eps)
    return result


def norm_modulate(x: mx.array, norm: str, eps: float, differentiable, **inputs) -> mx.array:
    """residual + gate * (norm(x) * weight * scale + shift) of x (B, N, D) in one pass of the kernel (call
    `supports_norm_modulate` first); `norm` "none", "rms" or "layer" (no affine); inputs left out are absent.
    Its gradients are those of `differentiable(x, **inputs)`."""
    names = [name for name in _MODULATION_INPUTS if name in inputs]

    def forward(x, *arrays):
        return _norm_modulate_forward(x, dict(zip(names, arrays)), norm, eps)

    def in_mlx(x, *arrays):
        return differentiable(x, **dict(zip(names, arrays)))

    return _with_gradients_of(in_mlx, forward)(x, *(inputs[name] for name in names))
