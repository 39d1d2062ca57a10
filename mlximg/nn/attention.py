"""Multi-head attention core: MLX's fused scaled-dot-product kernel; on the CPU in float32 the compiled kernel of
native.py, or a softmax with a faster exp (cpu_math.py), as dispatch.py chooses. MLX's CPU sdpa spends most of
its time in exp."""

import mlx.core as mx

from . import cpu_math, dispatch, native


def merge_heads(out: mx.array) -> mx.array:
    """(B, heads, N, head_dim) -> (B, N, heads * head_dim)."""
    batch, heads, length, head_dim = out.shape
    return out.transpose(0, 2, 1, 3).reshape(batch, length, heads * head_dim)


# Head dims of MLX's fused full-sequence attention on the GPU, which keeps its scores in float32 internally.
FUSED_HEAD_DIMS = (64, 80, 128)


def scaled_dot_product_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
    """mx.fast.scaled_dot_product_attention, (B, heads, N, D) in and out. Where MLX has no fused kernel (the CPU;
    other head dims, such as the VAE's 512, on the GPU) it composes ops in the input dtype; then half-precision
    inputs run in float32 and the result is rounded once, as torch's SDPA computes internally."""
    fused = mx.default_device() == mx.gpu and q.shape[-1] in FUSED_HEAD_DIMS
    if q.dtype == mx.float32 or fused:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    out = mx.fast.scaled_dot_product_attention(*(a.astype(mx.float32) for a in (q, k, v)), scale=scale, mask=mask)
    return out.astype(q.dtype)


def attention(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None = None) -> mx.array:
    """q, k, v: (B, heads, N, head_dim) -> (B, N, heads * head_dim).

    `mask` is boolean (True = attend) or additive, broadcastable to (B, heads, N_q, N_k).
    """
    scale = q.shape[-1] ** -0.5
    path = dispatch.op_path(q, k, v)
    if path == "mlx":
        return merge_heads(scaled_dot_product_attention(q, k, v, scale, mask))

    def fast(q, k, v):
        return merge_heads(cpu_math.attention(q, k, v, scale, mask))

    if path == "native" and native.supports_attention(q, k, v, mask):
        return native.attention(q, k, v, scale, mask, fast)
    return fast(q, k, v)


def split_heads(x: mx.array, heads: int) -> mx.array:
    """(B, N, heads * head_dim) -> (B, heads, N, head_dim)."""
    batch, length, width = x.shape
    return x.reshape(batch, length, heads, width // heads).transpose(0, 2, 1, 3)
