"""FP8 weight quantization (MLX mxfp8): which layers (policy), the on-disk format, the execution path, third-party
float8 checkpoints and checkpoint conversion (convert.py, imported on demand: it needs the model loaders)."""

from .execution import FP8_ENV, fp8_execution
from .format import Quantization
from .policy import layer_policy

__all__ = ["FP8_ENV", "Quantization", "fp8_execution", "layer_policy"]
