"""Putting FP8 weights into modules: the QuantizedLinear structure a quantized checkpoint's layers load into."""

import mlx.nn as nn

from .format import Quantization


def quantize_structure(module: nn.Module, layers: list[str], quantization: Quantization) -> None:
    """Swap exactly `layers` for QuantizedLinear, so a strict load of the checkpoint's codes and scales fits."""
    wanted = set(layers)
    nn.quantize(module, group_size=quantization.group_size, bits=quantization.bits, mode=quantization.mode,
                class_predicate=lambda path, m: path in wanted)
    swapped = {path for path, m in module.named_modules() if isinstance(m, nn.QuantizedLinear)}
    if wanted - swapped:
        raise ValueError(f"quantized layers not in the model: {sorted(wanted - swapped)[:5]}")
