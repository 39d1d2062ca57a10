"""Which implementation every op runs (attention, SiLU / SwiGLU, QK RMSNorm + RoPE, a block's norm + modulation, the
VAE's 3x3 convolution and GroupNorm), chosen here by one setting, MLXIMG_OPS:

- "auto" (default): on the CPU in float32, the compiled kernels (native.py) where they are built, else MLX ops
  with a faster exp and CPU-stream splitting (cpu_math.py); MLX's own ops on other devices and dtypes.
- "fast": the cpu_math path where it applies, never the compiled kernels.
- "mlx": MLX's own ops everywhere (mx.fast.scaled_dot_product_attention, nn.silu, mx.conv2d, ...), exactly the
  op set that runs on Metal, so that the Mac configuration can be exercised on this CPU.
"""

import os

import mlx.core as mx

from . import native

OPS_ENV = "MLXIMG_OPS"
OP_SETS = ("auto", "fast", "mlx")


def op_set() -> str:
    choice = os.environ.get(OPS_ENV, "auto")
    if choice not in OP_SETS:
        raise ValueError(f"{OPS_ENV}={choice!r}: choose one of {', '.join(OP_SETS)}")
    return choice


def op_path(*arrays: mx.array) -> str:
    """"native", "fast" or "mlx": the implementation an op on `arrays` runs. The CPU paths are float32 only."""
    choice = op_set()
    cpu_float32 = mx.default_device() == mx.cpu and all(a.dtype == mx.float32 for a in arrays)
    if choice == "mlx" or not cpu_float32:
        return "mlx"
    return "native" if choice == "auto" and native.built() else "fast"


def status() -> str:
    """What the setting selects on this machine, in words, for `mlximg info`."""
    choice = op_set()
    if choice == "mlx":
        return f"MLX's own ops ({OPS_ENV}=mlx, as on Metal)"
    if mx.default_device() != mx.cpu:
        return "MLX's own ops (not on the CPU)"
    if choice == "fast":
        return f"MLX ops with the fast exp ({OPS_ENV}=fast)"
    if native.built():
        return f"compiled CPU kernels ({native.status()})"
    return f"MLX ops with the fast exp (compiled CPU kernels {native.status()})"
