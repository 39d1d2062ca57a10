"""The quantization side of loading a component, as one keyword-only object that every loader passes on."""

from dataclasses import dataclass

from .execution import fp8_execution
from .format import Quantization


@dataclass(frozen=True)
class QuantOptions:
    """`quantize`: quantize a float checkpoint's policy layers to this mode as it loads (None: keep it float);
    `execution`: how quantized weights run, "matmul" (QuantizedLinear), "dequantize" (float weights from load
    on) or "layerwise" (kept quantized, each layer's weight dequantized just before its float matmul), None for
    MLXIMG_FP8 or the backend's default; `float8_checkpoint`: the weights are third-party float8, folded with
    their scales when read (set by the loader from the safetensors headers)."""

    quantize: Quantization | None = None
    execution: str | None = None
    float8_checkpoint: bool = False

    def __post_init__(self):
        object.__setattr__(self, "execution", fp8_execution(self.execution))
