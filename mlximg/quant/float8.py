"""Third-party FP8 checkpoints: float8_e4m3fn weights (read by mx.load as uint8 codes) with a weight scale.

Scale names supported, per tensor (a scalar) or per output row ((O,) or (O, 1)):
  `<layer>.weight_scale`  compressed-tensors / llm-compressor and ComfyUI's newer mixed-precision format
  `<layer>.scale_weight`  ComfyUI's "scaled fp8" checkpoints (Kijai et al.)
A float8 weight without a scale has scale 1 (plain `.to(float8_e4m3fn)` checkpoints). Activation scales
(`input_scale`, `scale_input`) and markers (`scaled_fp8`, `.comfy_quant`) are dropped: we compute in float.
The safetensors header's dtype (F8_E4M3), not the uint8 array, says which tensors are float8.
"""

from pathlib import Path
from typing import Iterable

import mlx.core as mx

FLOAT8_DTYPE = "F8_E4M3"
SCALE_SUFFIXES = (".weight_scale", ".scale_weight")
DROPPED_SUFFIXES = (".input_scale", ".scale_input", ".comfy_quant")
DROPPED_KEYS = ("scaled_fp8",)


def float8_keys(headers: Iterable[tuple[Path, dict]]) -> set[str]:
    """The tensors stored as float8 (e4m3), from (path, safetensors header) pairs; e5m2, which mx.from_fp8 does
    not read, is refused by name."""
    keys = set()
    for path, header in headers:
        for key, entry in header.items():
            dtype = entry.get("dtype") if isinstance(entry, dict) else None
            if dtype == FLOAT8_DTYPE:
                keys.add(key)
            elif dtype is not None and dtype.startswith("F8"):
                raise ValueError(f"{path}: tensor {key!r} has dtype {dtype}; only float8 {FLOAT8_DTYPE} is supported")
    return keys


def _scale_of(weights: dict[str, mx.array], layer: str, rows: int) -> tuple[str | None, mx.array]:
    for suffix in SCALE_SUFFIXES:
        key = layer + suffix
        if key in weights:
            scale = weights[key].astype(mx.float32)
            if scale.size == 1:
                return key, scale.reshape(())
            if scale.size == rows:
                return key, scale.reshape(rows, 1)
            raise ValueError(f"{key} has shape {tuple(scale.shape)}; expected a scalar or one scale per row ({rows})")
    return None, mx.array(1.0)


def fold_float8(weights: dict[str, mx.array], keys: set[str], name: str) -> dict[str, mx.array]:
    """float8 weights -> float32 `mx.from_fp8(w) * scale`; scale and activation-scale keys removed."""
    out = dict(weights)
    for key in keys - set(DROPPED_KEYS):
        if not key.endswith(".weight"):
            raise ValueError(f"{name}: float8 tensor {key!r} is not a layer weight")
        value = out[key]
        scale_key, scale = _scale_of(out, key.removesuffix(".weight"), value.shape[0])
        out[key] = mx.from_fp8(value, dtype=mx.float32) * scale
        out.pop(scale_key, None)
    for key in list(out):
        if key in DROPPED_KEYS or key.endswith(DROPPED_SUFFIXES):
            del out[key]
    return out
