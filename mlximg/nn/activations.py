"""SiLU as a layer, for the module lists of checkpoints (`mlp.1`, `adaLN_modulation.0`): mlximg's `silu`, so that
every SiLU takes the op path dispatch.py picks and rounds half precision as torch does."""

import mlx.core as mx
import mlx.nn as nn

from .cpu_math import silu


class SiLU(nn.Module):
    def __call__(self, x: mx.array) -> mx.array:
        return silu(x)
