"""What `mlximg info` reports: the backend, device, dtype policy, FP8 execution path, BLAS, CPU kernels, library
versions, and this process's rank in a launched group."""

import platform
from importlib.metadata import PackageNotFoundError, version

import mlx.core as mx

from . import __version__
from .distributed import rank_line
from .nn import dispatch
from .quant.execution import fp8_execution, fp8_execution_source
from .runtime import backend, blas_status, compute_dtype, dtype_name


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _fp8_path() -> str:
    try:
        return f"{fp8_execution()} ({fp8_execution_source()})"
    except ValueError as error:
        return f"invalid: {error}"


def _ops() -> str:
    try:
        return dispatch.status()
    except ValueError as error:
        return f"invalid: {error}"


def info() -> dict[str, str]:
    return {
        "mlximg": __version__,
        "mlx": mx.__version__,
        "mlx-lm": _package_version("mlx-lm"),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "backend": backend(),
        "device": str(mx.default_device()),
        "compute dtype": dtype_name(compute_dtype()),
        "fp8 path": _fp8_path(),
        "blas": blas_status() if backend() == "cpu" else f"n/a on {backend()} ({blas_status()} for CPU ops)",
        "ops": _ops(),
        "distributed": rank_line(),
    }
