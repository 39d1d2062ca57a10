"""Backend detection and the compute dtype policy."""

import os

import mlx.core as mx

DTYPE_ENV = "MLXIMG_DTYPE"
_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def backend() -> str:
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return "cpu"


def dtype_name(dtype: mx.Dtype) -> str:
    return next(name for name, value in _DTYPES.items() if value == dtype)


def compute_dtype(override: str | mx.Dtype | None = None) -> mx.Dtype:
    """bfloat16 on GPU backends, float32 on the CPU, where MLX's bfloat16 matmul is ~30x slower than BLAS.

    An explicit `override`, else the MLXIMG_DTYPE environment variable, wins.
    """
    choice = override if override is not None else os.environ.get(DTYPE_ENV)
    if choice is None:
        return mx.float32 if backend() == "cpu" else mx.bfloat16
    if isinstance(choice, mx.Dtype):
        return choice
    if choice not in _DTYPES:
        raise ValueError(f"unknown dtype {choice!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[choice]
