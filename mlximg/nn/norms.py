"""Normalisation layers: RMSNorm (learned scale) and affine-free LayerNorm, on MLX's fused kernels."""

import mlx.core as mx
import mlx.nn as nn


class RMSNorm(nn.Module):
    """RMSNorm with a `weight` parameter, as diffusers and transformers name it; statistics in float32."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


def layer_norm(x: mx.array, eps: float = 1e-6) -> mx.array:
    """LayerNorm without scale or bias (adaLN supplies them)."""
    return mx.fast.layer_norm(x, None, None, eps)
