"""The text encoders' decoder layers: mlx-lm's Qwen3 / Llama (Mistral) modules, weights and checkpoints, run by a
forward of ours whose attention and SwiGLU go through mlximg's op dispatch, so that the CPU kernels apply
without assigning anything in mlx-lm's modules (which every thread shares).

`decoder_layer` is mlx-lm's TransformerBlock.__call__ without a KV cache (the encoders run one pass over the
prompt), with `scaled_dot_product_attention` and `mlp` in place of mlx-lm's module functions.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import base

from ..nn import dispatch, merge_heads, native, silu_mul
from ..nn import scaled_dot_product_attention as sdpa


@dataclass(frozen=True)
class PaddedCausalMask:
    """Causal attention with padded keys hidden: `keys` (B, 1, 1, L), True for real tokens. The kernel takes it as
    is; `dense()` is the (B, 1, L, L) boolean mask MLX's sdpa takes."""

    keys: mx.array

    def dense(self) -> mx.array:
        length = self.keys.shape[-1]
        return mx.tril(mx.ones((length, length), dtype=mx.bool_)) & self.keys


def _kernel_mask(mask) -> tuple[bool, mx.array | None] | None:
    """(causal, key mask) as the kernel takes `mask`, or None if it cannot."""
    if mask is None:
        return False, None
    if isinstance(mask, str):
        return (True, None) if mask == "causal" else None
    if isinstance(mask, PaddedCausalMask):
        return True, mask.keys
    return None


def scaled_dot_product_attention(queries, keys, values, cache, scale: float, mask, sinks=None) -> mx.array:
    """mlx_lm.models.base.scaled_dot_product_attention, also accepting a PaddedCausalMask, on the CPU kernel
    where the op dispatch chooses it; (B, heads, L, D) in and out, as mlx-lm's."""
    kernel_mask = _kernel_mask(mask) if cache is None and sinks is None else None
    if (kernel_mask is not None and dispatch.op_path(queries) == "native"
            and native.supports_attention(queries, keys, values, kernel_mask[1])):
        causal, key_mask = kernel_mask
        dense = mask.dense() if isinstance(mask, PaddedCausalMask) else mask

        def in_mlx(q, k, v):
            return merge_heads(sdpa(q, k, v, scale, dense))

        out = native.attention(queries, keys, values, scale, key_mask, in_mlx, causal=causal)
        batch, length, heads = queries.shape[0], queries.shape[2], queries.shape[1]
        return out.reshape(batch, length, heads, -1).transpose(0, 2, 1, 3)
    if isinstance(mask, PaddedCausalMask):
        mask = mask.dense()
    if cache is None and sinks is None:
        return sdpa(queries, keys, values, scale, mask)
    return base.scaled_dot_product_attention(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)


def attention(attn: nn.Module, x: mx.array, mask) -> mx.array:
    """mlx-lm's Qwen3 / Llama Attention.__call__ without a cache (Qwen3 norms q and k per head, Llama does not)."""
    batch, length, _ = x.shape
    queries = attn.q_proj(x).reshape(batch, length, attn.n_heads, -1)
    keys = attn.k_proj(x).reshape(batch, length, attn.n_kv_heads, -1)
    values = attn.v_proj(x).reshape(batch, length, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    if "q_norm" in attn:
        queries, keys = attn.q_norm(queries), attn.k_norm(keys)
    queries, keys = attn.rope(queries.transpose(0, 2, 1, 3)), attn.rope(keys.transpose(0, 2, 1, 3))
    out = scaled_dot_product_attention(queries, keys, values, None, scale=attn.scale, mask=mask)
    return attn.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


def mlp(block: nn.Module, x: mx.array) -> mx.array:
    """mlx-lm's SwiGLU MLP."""
    return block.down_proj(silu_mul(block.gate_proj(x), block.up_proj(x)))


def decoder_layer(layer: nn.Module, x: mx.array, mask) -> mx.array:
    """mlx-lm's pre-norm TransformerBlock: attention, then the MLP, each added to the residual stream."""
    h = x + attention(layer.self_attn, layer.input_layernorm(x), mask)
    return h + mlp(layer.mlp, layer.post_attention_layernorm(h))
