"""The FP8 side of loading a component, as one keyword-only object that every loader passes on."""

from dataclasses import dataclass

from .execution import fp8_execution


@dataclass(frozen=True)
class FP8Options:
    """`quantize_at_load`: quantize a float checkpoint's policy layers to mxfp8 as it loads; `execution`: how FP8
    weights run, "matmul" (QuantizedLinear) or "dequantize" (float weights), None for MLXIMG_FP8 or the backend's
    default; `float8_checkpoint`: the weights are third-party float8, folded with their scales when read (set by
    the loader from the safetensors headers)."""

    quantize_at_load: bool = False
    execution: str | None = None
    float8_checkpoint: bool = False

    def __post_init__(self):
        object.__setattr__(self, "execution", fp8_execution(self.execution))
