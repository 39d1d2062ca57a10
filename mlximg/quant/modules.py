"""Putting FP8 weights into modules: the QuantizedLinear structure for a quantized checkpoint, and quantizing a
loaded module's policy layers on the fly (quantize="fp8"), on either execution path."""

import re

import mlx.nn as nn

from .format import Quantization
from .policy import quantizable


def quantize_structure(module: nn.Module, layers: list[str], quantization: Quantization) -> None:
    """Swap exactly `layers` for QuantizedLinear, so a strict load of the checkpoint's codes and scales fits."""
    wanted = set(layers)
    nn.quantize(module, group_size=quantization.group_size, bits=quantization.bits, mode=quantization.mode,
                class_predicate=lambda path, m: path in wanted)
    swapped = {path for path, m in module.named_modules() if isinstance(m, nn.QuantizedLinear)}
    if wanted - swapped:
        raise ValueError(f"quantized layers not in the model: {sorted(wanted - swapped)[:5]}")


def quantize_module(module: nn.Module, policy: re.Pattern | None, execution: str,
                    quantization: Quantization = Quantization()) -> list[str]:
    """Quantize the policy's Linear layers of a loaded module; returns their paths.

    matmul: swapped for QuantizedLinear. dequantize: weights replaced by their FP8 round trip (float compute,
    the same numbers an FP8 checkpoint gives).
    """
    layers = [path for path, m in module.named_modules()
              if type(m) is nn.Linear and quantizable(path, m.weight.shape, policy)]
    if execution == "matmul":
        quantize_structure(module, layers, quantization)
        return layers
    for path in layers:
        linear = module
        for part in path.split("."):
            linear = linear[int(part)] if isinstance(linear, list) else getattr(linear, part)
        dtype = linear.weight.dtype
        linear.weight = quantization.dequantize(*quantization.quantize(linear.weight)).astype(dtype)
    return layers
