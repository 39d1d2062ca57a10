"""Multi-head attention core: MLX's fused scaled-dot-product kernel; on the CPU in float32 the compiled kernel of
native.py, or a softmax with a faster exp (cpu_math.py), as dispatch.py chooses. MLX's CPU sdpa spends most of
its time in exp."""

import mlx.core as mx

from . import cpu_math, dispatch, native


def merge_heads(out: mx.array) -> mx.array:
    """(B, heads, N, head_dim) -> (B, N, heads * head_dim)."""
    batch, heads, length, head_dim = out.shape
    return out.transpose(0, 2, 1, 3).reshape(batch, length, heads * head_dim)


def attention(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None = None) -> mx.array:
    """q, k, v: (B, heads, N, head_dim) -> (B, N, heads * head_dim).

    `mask` is boolean (True = attend) or additive, broadcastable to (B, heads, N_q, N_k).
    """
    scale = q.shape[-1] ** -0.5
    path = dispatch.op_path(q, k, v)
    if path == "mlx":
        return merge_heads(mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask))

    def fast(q, k, v):
        return merge_heads(cpu_math.attention(q, k, v, scale, mask))

    if path == "native" and native.supports_attention(q, k, v, mask):
        return native.attention(q, k, v, scale, mask, fast)
    return fast(q, k, v)


def split_heads(x: mx.array, heads: int) -> mx.array:
    """(B, N, heads * head_dim) -> (B, heads, N, head_dim)."""
    batch, length, width = x.shape
    return x.reshape(batch, length, heads, width // heads).transpose(0, 2, 1, 3)
