"""What a model folder supports, read from its config files and safetensors headers alone (cheap, and before any
heavy import): the multiple image sides must be of, the largest image, and a lower bound of a run's peak memory,
checked against this machine's memory before any work."""

import os
from dataclasses import dataclass
from pathlib import Path

from ..loading import read_config
from ..planner import component_bytes, headers

MAX_STEPS = 1000  # the schedulers' training timesteps; more steps only repeat sigmas
# Black Forest Labs document FLUX.2 output up to 4 megapixels.
FLUX2_MAX_PIXELS = 4 * 2**20
FLUX2_PIXELS_PER_TOKEN = 16  # the VAE's 8x and a 2x2 patch


@dataclass(frozen=True)
class SizeLimits:
    multiple: int  # both sides a multiple of this
    max_width: int
    max_height: int
    max_pixels: int | None = None

    def check(self, width: int, height: int) -> None:
        for name, value, limit in (("width", width, self.max_width), ("height", height, self.max_height)):
            if value > limit:
                raise ValueError(f"{name} {value} is larger than this model supports ({limit}: its position "
                                 "embedding's range)")
        if self.max_pixels is not None and width * height > self.max_pixels:
            raise ValueError(f"{width}x{height} is {width * height / 2**20:.1f} Mpx; this model family supports "
                             f"at most {self.max_pixels / 2**20:.0f} Mpx")


def vae_downsampling(model_dir: Path) -> int:
    """Image pixels per latent pixel along a side (8 for the released VAEs), as diffusers computes it."""
    return 2 ** (len(read_config(Path(model_dir) / "vae").get("block_out_channels", (0,) * 4)) - 1)


def size_limits(family: str, model_dir: Path | None) -> SizeLimits:
    """The family's limits, refined by the folder's configs where it is on disk (None: not downloaded yet)."""
    if family == "flux2":
        return SizeLimits(FLUX2_PIXELS_PER_TOKEN, 2**16, 2**16, FLUX2_MAX_PIXELS)
    if model_dir is None:
        return SizeLimits(16, 8192, 8192)
    # Z-Image: positions (caption, row, column) index RoPE tables of axes_lens entries, in 2x2 patches.
    scale = 2 * vae_downsampling(model_dir)
    axes_lens = read_config(Path(model_dir) / "transformer").get("axes_lens", (1024, 512, 512))
    return SizeLimits(scale, axes_lens[2] * scale, axes_lens[1] * scale)


def machine_memory() -> int | None:
    """Physical memory in bytes (unified memory on Apple Silicon), or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_peak_memory(family: str, model_dir: Path, width: int, height: int, batch: int, compute_bytes: int,
                         tiled_decode: bool = False) -> int:
    """A lower bound of a run's peak bytes: the transformer's and VAE's weights, plus the larger of one block's
    activations and the VAE decoder's full-resolution activations (the text encoder is gone by then)."""
    # Floating tensors at the compute width, packed ones as stored.
    weights = sum(component_bytes(headers(Path(model_dir) / name), compute_bytes) for name in ("transformer", "vae"))
    transformer = read_config(Path(model_dir) / "transformer")
    if family == "flux2":
        tokens = (width // FLUX2_PIXELS_PER_TOKEN) * (height // FLUX2_PIXELS_PER_TOKEN) + 512
        dim = transformer.get("num_attention_heads", 48) * transformer.get("attention_head_dim", 128)
    else:
        scale = 2 * vae_downsampling(model_dir)
        tokens = (width // scale) * (height // scale) + 512
        dim = transformer.get("dim", 3840)
    # Residual stream, q / k / v and the MLP's hidden units of one block, at least.
    block = batch * tokens * dim * compute_bytes * 8
    vae = read_config(Path(model_dir) / "vae")
    channels = (vae.get("decoder_block_out_channels") or vae.get("block_out_channels") or (128,))[0]
    pixels = min(width * height, 512 * 512) if tiled_decode else width * height
    decode = pixels * channels * compute_bytes * 3  # a convolution's input and output and a norm's
    return weights + max(block, decode)


def check_memory(estimate: int, available: int | None = None) -> None:
    available = machine_memory() if available is None else available
    if available is not None and estimate > available:
        raise ValueError(f"this run needs at least {estimate / 2**30:.1f} GiB, more than this machine's "
                         f"{available / 2**30:.1f} GiB: choose a smaller size (or tiled decoding)")
