"""A compiled softmax-attention kernel for MLX's CPU backend (cpu_attention.cpp), built on first use.

MLX has no fused CPU attention: its graph writes the N x N scores several times and its exp is scalar, so attention
was most of a denoising step here. The kernel keeps MLX's BLAS for the two matmuls and does the softmax in one
vectorised pass over cache-sized blocks (2-2.5x faster than torch's CPU attention, docs/MEASUREMENTS.md). It is
compiled with g++ (which MLX's own CPU compiler also calls) into a cache folder keyed by the source and compiler,
and used on Linux when mlximg preloaded OpenBLAS (its cblas_sgemm is handed to the kernel). Where any of that is
missing, `attention` returns None and callers keep the MLX path; `status()` says why.

The kernel runs outside MLX's graph: the inputs are evaluated first (a host synchronisation, harmless on the CPU,
whose work runs in order anyway) and the result comes back as a new array. Gradients come from the MLX path
(custom_function vjp), so training through it stays exact.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..runtime import blas

OPT_OUT_ENV = "MLXIMG_NATIVE"  # set to 0 to keep MLX's own ops
SOURCE = Path(__file__).with_name("cpu_attention.cpp")
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
    target = folder / f"cpu_attention-{key}.so"
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            built = Path(scratch) / target.name
            result = subprocess.run([compiler, *_FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
            os.replace(built, target)
    return target


@lru_cache(maxsize=None)
def _kernel():
    """(attention function, cblas_sgemm address), or None with the reason kept for `status`."""
    if os.environ.get(OPT_OUT_ENV, "1") == "0":
        _reason["text"] = f"disabled by {OPT_OUT_ENV}=0"
        return None
    openblas = blas.preload_system_blas()
    if not sys.platform.startswith("linux") or openblas is None:
        _reason["text"] = "needs Linux with mlximg's OpenBLAS (" + blas.blas_status() + ")"
        return None
    if (compiler := _compiler()) is None:
        _reason["text"] = "no C++ compiler (g++, or $CXX) found"
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError) as error:
        _reason["text"] = f"building the kernel failed: {error}"
        return None
    function = library.attention_f32
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 5 + [_Strides] * 4 + [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_float]
    _reason["text"] = f"built in {cache_dir()}"
    return function, ctypes.cast(ctypes.CDLL(openblas).cblas_sgemm, ctypes.c_void_p).value


def status() -> str:
    """Whether the kernel is in use, in words."""
    return ("in use: " if _kernel() else "not used: ") + _reason["text"]


def _host_view(a: mx.array) -> np.ndarray:
    """A NumPy view of an evaluated array (a copy only if its last axis is not contiguous)."""
    view = np.array(a, copy=False)
    return view if view.strides[-1] == view.itemsize else np.ascontiguousarray(view)


def _element_strides(a: np.ndarray) -> ctypes.Array:
    return _Strides(*(s // a.itemsize for s in a.strides[:3]))


def _key_valid(mask: mx.array | None, batch: int, keys: int) -> np.ndarray | None:
    """A boolean key mask (B or 1, 1, 1, N_k) as (B or 1, N_k padded to the vector width) floats of 0 / 1."""
    if mask is None:
        return None
    rows = np.array(mask).reshape(mask.shape[0], keys)
    valid = np.zeros((rows.shape[0], -(-keys // _LANES) * _LANES), np.float32)
    valid[:, :keys] = rows
    return valid


def supports(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None) -> bool:
    """Whether `attention` can take these inputs: float32 on the CPU, one key mask for all queries at most."""
    if not all(a.dtype == mx.float32 and a.ndim == 4 for a in (q, k, v)) or mx.default_device() != mx.cpu:
        return False
    key_mask = mask is None or (mask.dtype == mx.bool_ and mask.ndim == 4 and mask.shape[1:3] == (1, 1)
                                and mask.shape[-1] == k.shape[-2])
    return key_mask and _kernel() is not None


def _forward(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None) -> mx.array:
    function, sgemm = _kernel()
    mx.eval(q, k, v)
    qn, kn, vn = (_host_view(a) for a in (q, k, v))
    batch, heads, length, head_dim = qn.shape
    out = np.empty((batch, length, heads, head_dim), np.float32)
    valid = _key_valid(mask, batch, kn.shape[2])
    valid_stride = 0 if valid is None or valid.shape[0] == 1 else valid.shape[1]
    code = function(sgemm, qn.ctypes.data, kn.ctypes.data, vn.ctypes.data, out.ctypes.data, batch, heads, length,
                    kn.shape[2], head_dim, _element_strides(qn), _element_strides(kn), _element_strides(vn),
                    _Strides(length * heads * head_dim, head_dim, heads * head_dim),
                    None if valid is None else valid.ctypes.data, valid_stride, scale)
    if code != 0:
        raise MemoryError("the CPU attention kernel could not allocate its score block")
    return mx.array(out.reshape(batch, length, heads * head_dim))


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None,
              differentiable) -> mx.array:
    """softmax(q k^T scale) v of (B, heads, N, D) inputs as (B, N, heads * D), by the kernel (call `supports`
    first). Its gradients are those of `differentiable(q, k, v)`, the same attention in MLX ops."""

    @mx.custom_function
    def kernel(q, k, v):
        return _forward(q, k, v, scale, mask)

    @kernel.vjp
    def kernel_vjp(primals, cotangent, _):
        return mx.vjp(differentiable, list(primals), [cotangent])[1]

    return kernel(q, k, v)
