"""Putting quantized weights into modules: the QuantizedLinear structure a quantized checkpoint's layers load into,
or its layerwise-dequantizing form."""

import mlx.core as mx
import mlx.nn as nn

from .format import Quantization


class LayerwiseLinear(nn.QuantizedLinear):
    """A QuantizedLinear (same parameters, same checkpoint keys) whose call dequantizes the weight to the input's
    dtype and runs a float matmul: on the CPU a BLAS matmul, far faster than MLX's quantized kernel there, while
    only one layer's float weight exists at a time."""

    def __call__(self, x: mx.array) -> mx.array:
        # Without the dependency on x, MLX's scheduler dequantizes many layers' weights ahead of their matmuls
        # (they depend on nothing computed), holding several float copies at once.
        packed = [self[name] for name in ("weight", "scales", "biases") if name in self]
        codes, scales, *biases = mx.depends(packed, [x])
        weight = mx.dequantize(codes, scales, *biases, group_size=self.group_size, bits=self.bits, mode=self.mode,
                               dtype=x.dtype)
        y = x @ weight.T
        return y + self["bias"] if "bias" in self else y


def quantize_structure(module: nn.Module, layers: list[str], quantization: Quantization,
                       layerwise: bool = False) -> None:
    """Swap exactly `layers` for QuantizedLinear (or LayerwiseLinear), so a strict load of the checkpoint's codes
    and scales fits."""
    wanted = set(layers)
    nn.quantize(module, group_size=quantization.group_size, bits=quantization.bits, mode=quantization.mode,
                class_predicate=lambda path, m: path in wanted)
    swapped = {path: m for path, m in module.named_modules() if isinstance(m, nn.QuantizedLinear)}
    if wanted - set(swapped):
        raise ValueError(f"quantized layers not in the model: {sorted(wanted - set(swapped))[:5]}")
    if layerwise:
        for layer in swapped.values():
            layer.__class__ = LayerwiseLinear  # the same object and parameters; only the call differs
