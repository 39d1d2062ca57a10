"""Will it fit? Each phase's resident weights, an activation estimate and the expected peak of a run, from the
model's configs and safetensors headers alone: a local folder's, or a Hugging Face repo's read over the network
(the headers only, no weights downloaded).

The phases are the pipeline's: encode (the text encoder alone, released afterwards), denoise (the transformer),
decode (the transformer, still loaded, and the VAE). Weights are counted at the compute width, quantized layers
at their mode's bytes (as they stay in memory on a Mac, or on the CPU with fp8="layerwise"). Activations:
encode, the text encoder's hidden states for 512 tokens; denoise, one block's working set per token for the
batch (with classifier-free guidance twice); decode, five full-resolution tensors of the VAE decoder's last width (the
measured peak of MLX's decoder), or of 512-px tiles when tiled.
"""

import math
from dataclasses import dataclass
from pathlib import Path

from .loading import read_config, weight_files
from .quant import layer_policy
from .quant.format import Quantization
from .quant.policy import quantizable

MEMORY_SIZES_GB = (8, 16, 24, 32, 48, 64, 96, 128)
# macOS lets the GPU use about three quarters of unified memory by default; the rest is the system's.
USABLE_SHARE = 0.75
TEXT_TOKENS = 512
DECODE_TENSORS = 5
# The layerwise path's float copy of a layer's weight and the transposed copy its matmul makes: the stack test
# (tests/test_quant_modes.py) measures 4.5 weights' worth for weight, copy and activations together.
LAYERWISE_COPIES = 2
BLOCK_TENSORS = 8  # Z-Image: residual stream, modulated input, q / k / v, attention output, ...
# FLUX.2's single-stream block per token: its fused projection (q, k, v and the MLP's 2 x 3 dim: 9 dim) and what
# follows it; fitted to the measured peaks of the mid klein (docs/MEASUREMENTS.md).
FLUX2_TOKEN_WIDTHS = 24
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "U32": 4, "U8": 1, "I8": 1, "I32": 4,
               "I64": 8}


@dataclass
class Phase:
    name: str
    weights: int
    activations: int

    @property
    def peak(self) -> int:
        return self.weights + self.activations


def component_bytes(headers: list[dict], compute_bytes: int, policy=None,
                    quantization: Quantization | None = None) -> int:
    """A component's weights in memory from its safetensors headers: float tensors at the compute width (or, for
    the layers `quantization` takes, at its bytes), packed tensors as stored."""
    total = 0
    for header in headers:
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            count = math.prod(entry["shape"])
            layer = key.removesuffix(".weight")
            if not entry["dtype"].startswith(("F", "BF")):
                total += count * DTYPE_BYTES.get(entry["dtype"], 4)
            elif (quantization is not None and key.endswith(".weight")
                  and quantizable(layer, tuple(entry["shape"]), policy, quantization.group_size)):
                total += quantization.stored_bytes(count, compute_bytes)
            else:
                total += count * compute_bytes
    return total


def largest_quantized(headers: list[dict], policy, quantization: Quantization | None) -> int:
    """Parameters of the largest weight `quantization` takes (0 without one): a quantized checkpoint's by its
    scales (one per group), a float one's by the layers the policy quantizes."""
    if quantization is None:
        return 0
    counts = [0]
    for header in headers:
        for key, entry in header.items():
            if key.endswith(".scales"):
                counts.append(math.prod(entry["shape"]) * quantization.group_size)
            elif (key.endswith(".weight") and entry["dtype"].startswith(("F", "BF"))
                  and quantizable(key.removesuffix(".weight"), tuple(entry["shape"]), policy, quantization.group_size)):
                counts.append(math.prod(entry["shape"]))
    return max(counts)


def headers(folder: Path) -> list[dict]:
    """The safetensors headers of a component folder."""
    from .loading import check_safetensors

    return [check_safetensors(path) for path in weight_files(folder)]


def _block_activations(family: str, transformer: dict, width: int, height: int, batch: int, scale: int,
                       compute_bytes: int) -> int:
    tokens = (width // scale) * (height // scale) + TEXT_TOKENS
    if family == "flux2":
        dim = transformer.get("num_attention_heads", 48) * transformer.get("attention_head_dim", 128)
        widths = FLUX2_TOKEN_WIDTHS * dim
    else:
        dim = transformer.get("dim", 3840)
        widths = BLOCK_TENSORS * dim + 2 * dim * 8 / 3  # and the SwiGLU's two hidden halves
    return int(batch * tokens * widths * compute_bytes)


def plan(folder: Path, family: str, *, width: int, height: int, num_images: int = 1, cfg: bool = False,
         quantize: str | Quantization | None = None, text_encoder_quantize: str | Quantization | None = None,
         compute_bytes: int = 2,
         tiled_decode: bool = False, text_encoder_dir: Path | None = None, layerwise: bool = False) -> list[Phase]:
    """The phases of a run of the model in `folder` (its configs and safetensors headers); `text_encoder_dir`:
    where its text encoder comes from, if not `folder`; `layerwise`: quantized weights dequantized per layer
    (the CPU's fp8="layerwise"), whose largest float weight and its matmul's copy add to a phase."""
    folder = Path(folder)
    modes = {"transformer": quantize, "text_encoder": text_encoder_quantize, "vae": None}
    folders = {name: folder / name for name in modes}
    folders["text_encoder"] = Path(text_encoder_dir or folder) / "text_encoder"
    weights, transient = {}, {}
    for name, mode in modes.items():
        config = read_config(folders[name])
        quantization = Quantization.from_config(config) or (Quantization.named(mode) if isinstance(mode, str)
                                                             else mode)
        found = headers(folders[name])
        weights[name] = component_bytes(found, compute_bytes, layer_policy(name, config), quantization)
        largest = largest_quantized(found, layer_policy(name, config), quantization) if layerwise else 0
        transient[name] = LAYERWISE_COPIES * largest * compute_bytes
    text = read_config(folders["text_encoder"])
    width_text = text.get("hidden_size") or (text.get("text_config") or {}).get("hidden_size", 4096)
    encode = TEXT_TOKENS * width_text * compute_bytes * 4  # one prompt's hidden states and a layer's work
    vae = read_config(folder / "vae")
    downsampling = 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)
    transformer = read_config(folder / "transformer")
    batch = num_images * (2 if cfg else 1)
    denoise = _block_activations(family, transformer, width, height, batch, 2 * downsampling, compute_bytes)
    channels = (vae.get("decoder_block_out_channels") or vae.get("block_out_channels") or (128,))[0]
    pixels = min(width * height, 512 * 512) if tiled_decode else width * height
    decode = pixels * channels * compute_bytes * DECODE_TENSORS
    return [Phase("encode", weights["text_encoder"], encode + transient["text_encoder"]),
            Phase("denoise", weights["transformer"], denoise + transient["transformer"]),
            Phase("decode", weights["transformer"] + weights["vae"], decode)]


def uses_cfg(folder: Path, family: str, guidance: float) -> bool:
    """Whether a run at `guidance` doubles the transformer's batch, as the pipelines decide: Z-Image above 0;
    FLUX.2 klein base above 1 (distilled klein and dev, which embeds guidance, never)."""
    if family == "zimage":
        return guidance > 0
    from .loading import read_json_object
    from .pipelines.flux2 import step_distilled

    distilled = step_distilled(read_json_object(Path(folder) / "model_index.json"))
    embedded = read_config(Path(folder) / "transformer").get("guidance_embeds", True)
    return guidance > 1 and not distilled and not embedded


def fits(peak: int) -> list[int]:
    """The memory sizes (GB) whose usable share holds `peak`."""
    return [size for size in MEMORY_SIZES_GB if peak <= size * 1e9 * USABLE_SHARE]


def table(phases: list[Phase]) -> str:
    peak = max(phase.peak for phase in phases)
    unit, scale = ("GiB", 2**30) if peak >= 2**30 else ("MiB", 2**20)
    lines = [f"{'phase':<9}{'weights ' + unit:>13}{'activations ' + unit:>17}{'peak ' + unit:>10}"]
    for phase in phases:
        lines.append(f"{phase.name:<9}{phase.weights / scale:>13.2f}{phase.activations / scale:>17.2f}"
                     f"{phase.peak / scale:>10.2f}")
    sizes = fits(peak)
    verdict = (f"fits Macs with {', '.join(f'{s} GB' for s in sizes)} (peak {peak / 2**30:.1f} GiB within "
               f"{USABLE_SHARE:.0%} of memory)" if sizes else f"needs more than {MEMORY_SIZES_GB[-1]} GB")
    return "\n".join([*lines, verdict])
