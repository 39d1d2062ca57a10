"""The FP8 component format: mlx-lm's QuantizedLinear keys (`<layer>.weight` uint32 E4M3 codes, `<layer>.scales`
uint8 E8M0 exponents) and the quantization recorded in config.json ("quantization") and each file's metadata.

Mode, bits and group size are read from the config, never inferred from shapes; which layers are quantized is
given by the presence of `<layer>.scales`, checked against the policy.
"""

import json
import re
from dataclasses import asdict, dataclass

import mlx.core as mx

from .policy import GROUP_SIZE, quantizable

CONFIG_KEY = "quantization"
METADATA_KEY = "mlximg.quantization"
MODE, BITS = "mxfp8", 8


@dataclass(frozen=True)
class Quantization:
    mode: str = MODE
    bits: int = BITS
    group_size: int = GROUP_SIZE

    @classmethod
    def from_config(cls, config: dict) -> "Quantization | None":
        """The config's "quantization" entry, validated; None for a float checkpoint."""
        spec = config.get(CONFIG_KEY)
        if spec is None:
            return None
        if not isinstance(spec, dict):
            raise ValueError(f"config.json 'quantization' must be an object, got {spec!r}")
        mode = spec.get("mode", "affine")  # mlx-lm's default when a config omits it
        if mode != MODE:
            raise ValueError(f"unsupported quantization mode {mode!r} in config.json (mlximg reads {MODE!r}, FP8)")
        bits, group_size = spec.get("bits"), spec.get("group_size")
        if bits != BITS:
            raise ValueError(f"{MODE} quantization has {BITS} bits; config.json says bits={bits!r}")
        if group_size != GROUP_SIZE:
            raise ValueError(f"{MODE} quantization has group size {GROUP_SIZE}; config.json says "
                             f"group_size={group_size!r}")
        return cls(mode, bits, group_size)

    def to_config(self) -> dict:
        return asdict(self)

    def metadata(self) -> dict[str, str]:
        """A quantized safetensors file's metadata (mlx-lm writes format "mlx")."""
        return {"format": "mlx", METADATA_KEY: json.dumps(self.to_config())}

    def quantize(self, weight: mx.array) -> tuple[mx.array, mx.array]:
        # From float32, so a bfloat16 source is not rounded twice.
        wq, scales = mx.quantize(weight.astype(mx.float32), group_size=self.group_size, bits=self.bits,
                                 mode=self.mode)[:2]
        return wq, scales

    def dequantize(self, wq: mx.array, scales: mx.array, dtype: mx.Dtype = mx.float32) -> mx.array:
        return mx.dequantize(wq, scales, group_size=self.group_size, bits=self.bits, mode=self.mode, dtype=dtype)


def quantize_weights(weights: dict[str, mx.array], policy: re.Pattern | None,
                     quantization: Quantization) -> dict[str, mx.array]:
    """Replace each policy layer's float `.weight` by its packed codes and add `.scales`; the rest is unchanged."""
    out = {}
    for key, value in weights.items():
        layer = key.removesuffix(".weight")
        if (key.endswith(".weight") and mx.issubdtype(value.dtype, mx.floating)
                and quantizable(layer, value.shape, policy)):
            out[key], out[f"{layer}.scales"] = quantization.quantize(value)
        else:
            out[key] = value
    return out


def quantized_layers(weights: dict[str, mx.array]) -> list[str]:
    return sorted(key.removesuffix(".scales") for key in weights if key.endswith(".scales"))


def check_quantized(weights: dict[str, mx.array], quantization: Quantization, policy: re.Pattern | None,
                    name: str) -> list[str]:
    """The quantized layers, after checking each against the policy, the dtypes and the config's group size."""
    layers = quantized_layers(weights)
    for layer in layers:
        wq, scales = weights.get(f"{layer}.weight"), weights[f"{layer}.scales"]
        if policy is None or policy.search(layer) is None:
            raise ValueError(f"{name}: layer {layer!r} is quantized, but the FP8 policy keeps it in high precision")
        if wq is None:
            raise ValueError(f"{name}: {layer}.scales has no {layer}.weight")
        if wq.dtype != mx.uint32 or scales.dtype != mx.uint8:
            raise ValueError(f"{name}: {layer} must be uint32 codes and uint8 scales for {quantization.mode}, "
                             f"got {wq.dtype} and {scales.dtype}")
        width = wq.shape[-1] * 32 // quantization.bits
        groups = width // quantization.group_size
        if scales.shape != (*wq.shape[:-1], groups):
            raise ValueError(f"{name}: {layer}.scales has shape {tuple(scales.shape)}, but input width {width} in "
                             f"groups of {quantization.group_size} (config.json) needs {(*wq.shape[:-1], groups)}")
    quantized = set(layers)
    for key, value in weights.items():
        if key.endswith(".weight") and value.dtype == mx.uint32 and key.removesuffix(".weight") not in quantized:
            raise ValueError(f"{name}: {key} holds packed {quantization.mode} codes but "
                             f"{key.removesuffix('.weight')}.scales is missing")
    return layers


def dequantize_weights(weights: dict[str, mx.array], layers: list[str],
                       quantization: Quantization) -> dict[str, mx.array]:
    """Each quantized layer back to a float32 `.weight` (the caller casts it to the compute dtype)."""
    out = {k: v for k, v in weights.items() if not k.endswith(".scales")}
    for layer in layers:
        out[f"{layer}.weight"] = quantization.dequantize(weights[f"{layer}.weight"], weights[f"{layer}.scales"])
    return out
