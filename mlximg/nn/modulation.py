"""The elementwise chains around every transformer block: a norm scaled by the adaLN modulation, and a (gated,
normed) branch added to the residual stream. Each is one call here, run by the path dispatch.py picks:

- "native" (the CPU in float32): one pass of native.py's kernel instead of MLX's three to five single-threaded
  passes over the block's activations;
- "mlx" on a GPU: one `mx.compile`d function per chain (shapeless, so no recompilation across steps, sizes or
  batches), which MLX fuses into the norm's kernel and one elementwise kernel;
- otherwise (the CPU's other paths, where MLX's CPU compiler makes these chains slower, not faster) the same
  function uncompiled.
"""

from functools import lru_cache

import mlx.core as mx

from . import dispatch, native

# Below this many values the kernel's host synchronisation costs more than MLX's lazily scheduled passes.
_KERNEL_MIN_VALUES = 1 << 16


def _chain(x, norm: str, eps: float, weight=None, scale=None, shift=None, residual=None, gate=None):
    """residual + gate * (norm(x) * weight * scale + shift) in MLX ops, absent inputs skipped: the reference for
    the kernel and the function that is compiled."""
    if norm == "rms":
        y = mx.fast.rms_norm(x, weight, eps)
    elif norm == "layer":
        y = mx.fast.layer_norm(x, weight, None, eps)
    else:
        y = x if weight is None else x * weight
    if scale is not None:
        y = y * scale
    if shift is not None:
        y = y + shift
    if gate is not None:
        y = gate * y
    return y if residual is None else residual + y


@lru_cache(maxsize=None)
def compiled_chain(norm: str, eps: float, names: tuple[str, ...]):
    """`_chain` for one norm and set of present inputs, as a shapeless compiled function of (x, *inputs)."""

    def chain(x, *arrays):
        return _chain(x, norm, eps, **dict(zip(names, arrays)))

    return mx.compile(chain, shapeless=True)


def fused(x: mx.array, norm: str, eps: float = 0.0, **inputs) -> mx.array:
    """residual + gate * (norm(x) * weight * scale + shift); `norm` "rms", "layer" (no affine) or "none"; inputs
    that are absent or None drop out. scale / shift / gate are per sample, (B or 1, 1, D)."""
    inputs = {name: a for name, a in inputs.items() if a is not None}
    path = dispatch.op_path(x, *inputs.values())
    # Without a norm MLX's two passes are as fast as the kernel's one, whose output is first zero-filled.
    if (path == "native" and norm != "none" and x.size >= _KERNEL_MIN_VALUES
            and native.supports_norm_modulate(x, **inputs)):
        return native.norm_modulate(x, norm, eps, lambda x, **a: _chain(x, norm, eps, **a), **inputs)
    if path == "mlx" and mx.default_device() == mx.gpu:
        names = tuple(sorted(inputs))
        return compiled_chain(norm, eps, names)(x, *(inputs[name] for name in names))
    return _chain(x, norm, eps, **inputs)


def scaled_norm(x: mx.array, norm, scale: mx.array) -> mx.array:
    """norm(x) * scale, `norm` an RMSNorm (Z-Image's modulated block inputs; scale holds 1 + scale)."""
    return fused(x, "rms", norm.eps, weight=norm.weight, scale=scale)


def add_normed(residual: mx.array, y: mx.array, norm, gate: mx.array | None = None) -> mx.array:
    """residual + gate * norm(y), `norm` an RMSNorm (Z-Image's post-normed, tanh-gated branches)."""
    return fused(y, "rms", norm.eps, weight=norm.weight, residual=residual, gate=gate)


def modulate(x: mx.array, shift: mx.array, scale: mx.array, eps: float) -> mx.array:
    """Affine-free LayerNorm, then shift and scale (FLUX.2's adaLN; scale holds 1 + scale)."""
    return fused(x, "layer", eps, scale=scale, shift=shift)


def add_gated(residual: mx.array, y: mx.array, gate: mx.array) -> mx.array:
    """residual + gate * y (FLUX.2's gated residual adds)."""
    return fused(y, "none", residual=residual, gate=gate)
