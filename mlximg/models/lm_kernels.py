"""The CPU kernels (nn/native.py) for the mlx-lm decoders that serve as text encoders.

mlx-lm's attention layers call the `scaled_dot_product_attention` and MLPs the `swiglu` of their model's module;
while `kernels_for(model)` is active those names point at the functions below, which take the native kernels where
they apply and mlx-lm's own functions otherwise, with the same results. mlx-lm's functions run MLX's scalar CPU exp
(~14 ns a value here): at a 512-token prompt that was most of a small encoder's time.
"""

import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import activations, base

from ..nn import merge_heads, native, silu_mul


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
    """mlx_lm.models.base.scaled_dot_product_attention, also accepting a PaddedCausalMask."""
    kernel_mask = _kernel_mask(mask) if cache is None and sinks is None else None
    if kernel_mask is not None and native.supports_attention(queries, keys, values, kernel_mask[1]):
        causal, key_mask = kernel_mask
        dense = mask.dense() if isinstance(mask, PaddedCausalMask) else mask

        def in_mlx(q, k, v):
            return merge_heads(mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=dense))

        out = native.attention(queries, keys, values, scale, key_mask, in_mlx, causal=causal)
        batch, length, heads = queries.shape[0], queries.shape[2], queries.shape[1]
        return out.reshape(batch, length, heads, -1).transpose(0, 2, 1, 3)  # mlx-lm transposes it back
    if isinstance(mask, PaddedCausalMask):
        mask = mask.dense()
    return base.scaled_dot_product_attention(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """mlx_lm.models.activations.swiglu on the CPU kernel where it applies."""
    return silu_mul(gate, x) if native.applies(gate, x) and gate.shape == x.shape else activations.swiglu(gate, x)


# The names are module attributes, shared by every thread: one encoder swaps them at a time.
_SWAP_LOCK = threading.RLock()


@contextmanager
def kernels_for(model: nn.Module):
    """Route the attention and SwiGLU of mlx-lm `model`'s layers through the functions above while active."""
    modules = {sys.modules[type(layer).__module__] for layer in model.layers}
    with _SWAP_LOCK:
        replaced = [(module, name, getattr(module, name)) for module in modules
                    for name in ("scaled_dot_product_attention", "swiglu") if hasattr(module, name)]
        for module, name, _ in replaced:
            setattr(module, name, globals()[name])
        try:
            yield
        finally:
            for module, name, original in replaced:
                setattr(module, name, original)
