"""Sinusoidal timestep embedding (the DiT / diffusers `get_timestep_embedding` convention)."""

import math

import mlx.core as mx


def timestep_embedding(
    t: mx.array, dim: int, *, max_period: float = 10000.0, flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0, scale: float = 1.0,
) -> mx.array:
    """(B,) timesteps -> (B, dim) float32 embedding: [cos, sin] halves when `flip_sin_to_cos`, else [sin, cos]."""
    half = dim // 2
    exponent = -math.log(max_period) * mx.arange(half, dtype=mx.float32) / (half - downscale_freq_shift)
    args = scale * (t.astype(mx.float32)[:, None] * mx.exp(exponent)[None])
    halves = [mx.cos(args), mx.sin(args)] if flip_sin_to_cos else [mx.sin(args), mx.cos(args)]
    embedding = mx.concatenate(halves, axis=-1)
    if dim % 2:
        embedding = mx.pad(embedding, [(0, 0), (0, 1)])
    return embedding
