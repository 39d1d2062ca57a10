"""How quantized weights run: quantized matmul (nn.QuantizedLinear) on GPU backends, dequantized to float at load
on the CPU, where MLX's quantized matmul is ~200x slower than a float32 OpenBLAS matmul (the quantized checkpoint
still saves disk and download; compute stays float). "layerwise" keeps them quantized in memory and
dequantizes each layer's weight just before its float matmul: resident memory follows the bit width, at the
cost of a dequantization per layer per call."""

import os

from ..runtime import backend

FP8_ENV = "MLXIMG_FP8"
PATHS = ("matmul", "dequantize", "layerwise")


def fp8_execution(override: str | None = None) -> str:
    """An explicit `override`, else the MLXIMG_FP8 environment variable, else the backend's default."""
    choice = override if override is not None else os.environ.get(FP8_ENV)
    if choice is None:
        return "dequantize" if backend() == "cpu" else "matmul"
    if choice not in PATHS:
        raise ValueError(f"unknown FP8 execution path {choice!r}; choose one of {', '.join(PATHS)}")
    return choice


def fp8_execution_source() -> str:
    """Where the active path comes from, for `mlximg info`."""
    return f"{FP8_ENV}={os.environ[FP8_ENV]}" if os.environ.get(FP8_ENV) else f"default on {backend()}"
