"""The quantized component format: mlx-lm's QuantizedLinear keys (`<layer>.weight` uint32 packed codes,
`<layer>.scales`: uint8 exponents / FP8 scales for mxfp8, mxfp4 and nvfp4, float scales and `<layer>.biases` for
affine) and the quantization recorded in config.json ("quantization") and each file's metadata.

Mode, bits and group size are read from the config, never inferred from shapes; which layers are quantized is
given by the presence of `<layer>.scales`, checked against the policy.
"""

import json
import re
from dataclasses import asdict, dataclass

import mlx.core as mx

from .policy import quantizable

CONFIG_KEY = "quantization"
METADATA_KEY = "mlximg.quantization"
# MLX's weight modes: the bit widths each takes and its group size (inputs per scale). mxfp8 / mxfp4 / nvfp4 keep
# 8-bit scales; affine (mlx-lm's format) keeps a scale and a bias per group, in the weights' float dtype.
MODES = {"mxfp8": ((8,), 32), "mxfp4": ((4,), 32), "nvfp4": ((4,), 16), "affine": ((4, 8), 64)}
# Names a user may give (quantize="...", --quantize, --text-encoder): a mode, or affine with its bits.
NAMES = {"fp8": ("mxfp8", 8), "mxfp8": ("mxfp8", 8), "mxfp4": ("mxfp4", 4), "nvfp4": ("nvfp4", 4),
         "affine4": ("affine", 4), "affine8": ("affine", 8)}


@dataclass(frozen=True)
class Quantization:
    mode: str = "mxfp8"
    bits: int = 8
    group_size: int = 32

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown quantization mode {self.mode!r}; choose one of {', '.join(MODES)}")
        bits, group_size = MODES[self.mode]
        if self.bits not in bits:
            raise ValueError(f"{self.mode} quantization takes bits {' or '.join(map(str, bits))}, not {self.bits!r}")
        if self.group_size != group_size:
            raise ValueError(f"{self.mode} quantization has group size {group_size}, not {self.group_size!r}")

    @classmethod
    def of(cls, mode: str, bits: int | None = None) -> "Quantization":
        """A mode with its bits (default: the mode's first) and group size."""
        if mode not in MODES:
            raise ValueError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
        allowed, group_size = MODES[mode]
        return cls(mode, allowed[0] if bits is None else bits, group_size)

    @classmethod
    def named(cls, name: str) -> "Quantization":
        """From a user's name: fp8 (= mxfp8), mxfp8, mxfp4, nvfp4, affine4, affine8."""
        if name not in NAMES:
            raise ValueError(f"unknown quantization {name!r}; choose one of {', '.join(NAMES)}")
        return cls.of(*NAMES[name])

    @classmethod
    def from_config(cls, config: dict) -> "Quantization | None":
        """The config's "quantization" entry, validated; None for a float checkpoint."""
        spec = config.get(CONFIG_KEY)
        if spec is None:
            return None
        if not isinstance(spec, dict):
            raise ValueError(f"config.json 'quantization' must be an object, got {spec!r}")
        mode = spec.get("mode", "affine")  # mlx-lm's default when a config omits it
        try:
            return cls(mode, spec.get("bits"), spec.get("group_size"))
        except ValueError as error:
            raise ValueError(f"config.json 'quantization': {error}") from None

    @property
    def name(self) -> str:
        return f"{self.mode}{self.bits}" if self.mode == "affine" else self.mode

    @property
    def has_biases(self) -> bool:
        return self.mode == "affine"

    @property
    def rounding_bound(self) -> float:
        """An upper bound on a layer's relative (Frobenius) rounding error: a larger one means a wrong conversion.
        8 bits keep 3 mantissa bits or 256 levels (below 2^-4 whatever the weights); 4 bits about 11% on
        Gaussian weights, bounded here at 0.25."""
        return 2.0**-4 if self.bits == 8 else 0.25

    def stored_bytes(self, count: int, float_bytes: int = 2) -> int:
        """Bytes of `count` quantized weights: the codes and each group's scale (and, for affine, its bias, both
        `float_bytes` wide: bfloat16 on disk, the compute dtype in memory)."""
        per_group = 2 * float_bytes if self.has_biases else 1
        return count * self.bits // 8 + count // self.group_size * per_group

    def to_config(self) -> dict:
        return asdict(self)

    def metadata(self) -> dict[str, str]:
        """A quantized safetensors file's metadata (mlx-lm writes format "mlx")."""
        return {"format": "mlx", METADATA_KEY: json.dumps(self.to_config())}

    def quantize(self, weight: mx.array) -> dict[str, mx.array]:
        """A weight's codes ("weight"), "scales" and, for affine, "biases" (in the weight's float dtype, as
        mlx-lm writes them). From float32, so a bfloat16 source is not rounded twice."""
        parts = mx.quantize(weight.astype(mx.float32), group_size=self.group_size, bits=self.bits, mode=self.mode)
        out = {"weight": parts[0], "scales": parts[1]}
        if self.has_biases:
            dtype = weight.dtype if weight.dtype in (mx.bfloat16, mx.float16) else mx.float32
            out["scales"], out["biases"] = parts[1].astype(dtype), parts[2].astype(dtype)
        return out

    def dequantize(self, wq: mx.array, scales: mx.array, biases: mx.array | None = None,
                   dtype: mx.Dtype = mx.float32) -> mx.array:
        return mx.dequantize(wq, scales, biases, group_size=self.group_size, bits=self.bits, mode=self.mode,
                             dtype=dtype)


def named_quantization(name: str | None) -> Quantization | None:
    return None if name is None else Quantization.named(name)


def quantize_weights(weights: dict[str, mx.array], policy: re.Pattern | None,
                     quantization: Quantization) -> dict[str, mx.array]:
    """Replace each policy layer's float `.weight` by its packed codes and add `.scales` (and `.biases`); the rest
    is unchanged."""
    out = {}
    for key, value in weights.items():
        layer = key.removesuffix(".weight")
        if (key.endswith(".weight") and mx.issubdtype(value.dtype, mx.floating)
                and quantizable(layer, value.shape, policy, quantization.group_size)):
            out.update({f"{layer}.{part}": array for part, array in quantization.quantize(value).items()})
        else:
            out[key] = value
    return out


def quantized_layers(weights: dict[str, mx.array]) -> list[str]:
    return sorted(key.removesuffix(".scales") for key in weights if key.endswith(".scales"))


def check_quantized(weights: dict[str, mx.array], quantization: Quantization, policy: re.Pattern | None,
                    name: str) -> list[str]:
    """The quantized layers, after checking each against the policy, the dtypes and the config's mode, bits and
    group size: a checkpoint whose tensors disagree with its recorded mode is refused."""
    layers = quantized_layers(weights)
    mode = quantization.mode
    for layer in layers:
        wq, scales = weights.get(f"{layer}.weight"), weights[f"{layer}.scales"]
        biases = weights.get(f"{layer}.biases")
        if policy is None or policy.search(layer) is None:
            raise ValueError(f"{name}: layer {layer!r} is quantized, but the policy keeps it in high precision")
        if wq is None:
            raise ValueError(f"{name}: {layer}.scales has no {layer}.weight")
        float_scales = mx.issubdtype(scales.dtype, mx.floating)
        if wq.dtype != mx.uint32 or float_scales != quantization.has_biases or (
                not float_scales and scales.dtype != mx.uint8):
            wanted = "float scales and biases" if quantization.has_biases else "uint8 scales"
            raise ValueError(f"{name}: {layer} must be uint32 codes and {wanted} for {mode} (config.json), got "
                             f"{wq.dtype} and {scales.dtype}")
        if quantization.has_biases != (biases is not None):
            raise ValueError(f"{name}: {layer}.biases is {'missing' if biases is None else 'present'}, but "
                             f"config.json says {mode}")
        width = wq.shape[-1] * 32 // quantization.bits
        groups = width // quantization.group_size
        expected = (*wq.shape[:-1], groups)
        for part, array in (("scales", scales), ("biases", biases)):
            if array is not None and array.shape != expected:
                raise ValueError(f"{name}: {layer}.{part} has shape {tuple(array.shape)}, but input width {width} in "
                                 f"groups of {quantization.group_size} ({mode}, {quantization.bits} bits, "
                                 f"config.json) needs {expected}")
    quantized = set(layers)
    for key, value in weights.items():
        if key.endswith(".weight") and value.dtype == mx.uint32 and key.removesuffix(".weight") not in quantized:
            raise ValueError(f"{name}: {key} holds packed {mode} codes but "
                             f"{key.removesuffix('.weight')}.scales is missing")
        if key.endswith(".biases") and key.removesuffix(".biases") not in quantized:
            raise ValueError(f"{name}: {key} has no {key.removesuffix('.biases')}.scales")
    return layers


def dequantize_weights(weights: dict[str, mx.array], layers: list[str],
                       quantization: Quantization) -> dict[str, mx.array]:
    """Each quantized layer back to a float32 `.weight` (the caller casts it to the compute dtype)."""
    out = {k: v for k, v in weights.items() if not k.endswith((".scales", ".biases"))}
    for layer in layers:
        out[f"{layer}.weight"] = quantization.dequantize(weights[f"{layer}.weight"], weights[f"{layer}.scales"],
                                                         weights.get(f"{layer}.biases"))
    return out
