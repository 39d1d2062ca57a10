"""Use a system OpenBLAS for MLX's CPU backend on Linux.

The `mlx-cpu` wheel links the reference netlib BLAS, which is ~35x slower than OpenBLAS for float32 matmul.
Loading OpenBLAS with RTLD_GLOBAL before `mlx` is first imported makes MLX's BLAS calls resolve to it.
This module must not import mlx.
"""

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

OPT_OUT_ENV = "MLXIMG_SYSTEM_BLAS"  # set to 0 to keep the wheel's bundled BLAS
_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

_state = {"library": None, "reason": "not attempted"}


def find_openblas() -> str | None:
    for path in _CANDIDATES:
        if Path(path).exists():
            return path
    return ctypes.util.find_library("openblas")


def preload_system_blas() -> str | None:
    """Load OpenBLAS globally if possible; return its path, or None with the reason kept for `blas_status`."""
    if _state["library"] is not None:
        return _state["library"]
    if not sys.platform.startswith("linux"):
        _state["reason"] = "not Linux (MLX uses the platform BLAS)"
    elif os.environ.get(OPT_OUT_ENV, "1") == "0":
        _state["reason"] = f"disabled by {OPT_OUT_ENV}=0"
    elif "mlx.core" in sys.modules:
        _state["reason"] = "mlx was imported before mlximg, too late to preload"
    elif (path := find_openblas()) is None:
        _state["reason"] = "no system OpenBLAS found (Debian: apt-get install libopenblas0-pthread)"
    else:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as error:
            _state["reason"] = f"loading {path} failed: {error}"
        else:
            _state["library"] = path
    return _state["library"]


def blas_status() -> str:
    """Which BLAS MLX's CPU backend uses, in words."""
    if _state["library"] is not None:
        return f"system OpenBLAS ({_state['library']})"
    if sys.platform == "darwin":
        return "Accelerate"
    return f"bundled reference BLAS ({_state['reason']})"
