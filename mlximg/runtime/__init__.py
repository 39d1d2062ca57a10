"""The MLX runtime layer: BLAS set-up, device and dtype policy, kept-array tracking, memory phases.

Importing this module preloads a system OpenBLAS on Linux, so it must be imported before `mlx`.
"""

from .blas import blas_status, preload_system_blas

preload_system_blas()

from .device import backend, compute_dtype, dtype_name  # noqa: E402
from .phases import PhaseLog, PhaseStats  # noqa: E402
from .tracker import Tracker, nbytes  # noqa: E402

__all__ = ["PhaseLog", "PhaseStats", "Tracker", "backend", "blas_status", "compute_dtype", "dtype_name", "nbytes",
           "preload_system_blas"]
