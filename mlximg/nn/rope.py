"""Multi-axis rotary position embedding (Z-Image: 3 axes, FLUX.2: 4 axes), channel pairs interleaved.

Tables are built once per run on the host from integer positions and reused by every block and step.
"""

import mlx.core as mx
import numpy as np

from . import dispatch, native


def rope_tables(
    positions: np.ndarray, axes_dims: tuple[int, ...], theta: float, *, float32_angles: bool = False
) -> tuple[mx.array, mx.array]:
    """cos and sin tables of shape (..., sum(axes_dims) // 2) for positions of shape (..., len(axes_dims)).

    Angles are computed in float64. `float32_angles` rounds them to float32 before cos/sin, as Z-Image does;
    FLUX.2 takes cos/sin of the float64 angles.
    """
    positions = np.asarray(positions, dtype=np.float64)
    if positions.shape[-1] != len(axes_dims):
        raise ValueError(f"positions must have shape (..., {len(axes_dims)}), got {positions.shape}")
    angles = []
    for axis, dim in enumerate(axes_dims):
        inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        angles.append(np.multiply.outer(positions[..., axis], inv_freq))
    angles = np.concatenate(angles, axis=-1)
    if float32_angles:
        angles = angles.astype(np.float32).astype(np.float64)
    return mx.array(np.cos(angles).astype(np.float32)), mx.array(np.sin(angles).astype(np.float32))


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate each channel pair (2i, 2i+1) of x (..., N, D) by the angle of its position; computed in float32."""
    pairs = x.astype(mx.float32).reshape(*x.shape[:-1], -1, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = mx.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


def norm_rope_heads(x: mx.array, norm, cos: mx.array, sin: mx.array) -> mx.array:
    """`norm` (an RMSNorm over the head dim, or None) then RoPE of x (B, N, heads, D), returned as (B, heads, N, D)
    for attention; tables (B or 1, 1, N, D / 2). One pass of the CPU kernel where it applies."""
    weight, eps = (None, 0.0) if norm is None else (norm.weight, norm.eps)

    def tokens_first(x, weight=None):  # the same in MLX ops, in x's layout
        if weight is not None:
            x = mx.fast.rms_norm(x, weight, eps)
        return apply_rope(x.transpose(0, 2, 1, 3), cos, sin).transpose(0, 2, 1, 3)

    if dispatch.op_path(x, cos) == "native" and native.supports_norm_rope(x, cos):
        out = native.rms_norm_rope(x, weight, eps, cos, sin, tokens_first)
    else:
        out = tokens_first(x, weight)
    return out.transpose(0, 2, 1, 3)
