"""Multi-head attention core on MLX's fused scaled-dot-product kernel."""

import mlx.core as mx


def attention(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None = None) -> mx.array:
    """q, k, v: (B, heads, N, head_dim) -> (B, N, heads * head_dim).

    `mask` is boolean (True = attend) or additive, broadcastable to (B, heads, N_q, N_k).
    """
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, mask=mask)
    batch, heads, length, head_dim = out.shape
    return out.transpose(0, 2, 1, 3).reshape(batch, length, heads * head_dim)


def split_heads(x: mx.array, heads: int) -> mx.array:
    """(B, N, heads * head_dim) -> (B, heads, N, head_dim)."""
    batch, length, width = x.shape
    return x.reshape(batch, length, heads, width // heads).transpose(0, 2, 1, 3)
