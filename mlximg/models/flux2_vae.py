"""AutoencoderKLFlux2, FLUX.2's VAE, in the diffusers checkpoint layout, and the latent space of the FLUX.2 pipelines.

The encoder and decoder are AutoencoderKL's (32 latent channels, 8x down, 1x1 quant convs), reused from
autoencoder_kl.py. What FLUX.2 adds is the space the transformer works in: 2x2 patches of the VAE latents
(128 channels at 1/16 of the image side), normalised with the running statistics of the checkpoint's BatchNorm
`bn`, which the pipelines read and never run as a layer. There is no scaling or shift factor.

Layouts, as diffusers' Flux2Pipeline / Flux2KleinPipeline: VAE latents (B, 32, H/8, W/8) NCHW; patchified
latents (B, 128, H/16, W/16) NCHW, channel c * 4 + 2 * dy + dx; packed tokens (B, H/16 * W/16, 128), row-major;
images NHWC in [-1, 1].
"""

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..configs import at_least, check_fields
from ..loading import load_component
from .autoencoder_kl import AutoencoderKL, config_from_dict, validate_blocks

_PATCH = 2  # the pipelines' _patchify_latents / _unpatchify_latents hard-code 2x2, whatever config.patch_size says


@dataclass
class AutoencoderKLFlux2Config:
    """Field names of diffusers' AutoencoderKLFlux2 config.json; the defaults are the released FLUX.2 VAE's
    (black-forest-labs/FLUX.2-dev vae/, shared by klein), equal to diffusers' class defaults."""

    in_channels: int = at_least(1, default=3)
    out_channels: int = at_least(1, default=3)
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = at_least(1, default=(128, 256, 512, 512))
    decoder_block_out_channels: tuple[int, ...] | None = at_least(1, default=None)
    layers_per_block: int = at_least(1, default=2)
    act_fn: str = "silu"
    latent_channels: int = at_least(1, default=32)
    norm_num_groups: int = at_least(1, default=32)
    sample_size: int = at_least(1, default=1024)
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    batch_norm_eps: float = at_least(0, default=1e-4)
    batch_norm_momentum: float = 0.1
    patch_size: tuple[int, int] = (_PATCH, _PATCH)
    force_upcast: bool = True  # in the released config.json, though not an argument of diffusers' class

    def __post_init__(self):
        check_fields(self)
        validate_blocks(self, "AutoencoderKLFlux2")
        decoder = self.decoder_channels
        if len(decoder) != len(self.up_block_types) or any(c % self.norm_num_groups for c in decoder):
            raise ValueError(
                f"AutoencoderKLFlux2: decoder_block_out_channels {decoder} must have one width per up block "
                f"({len(self.up_block_types)}), each divisible by norm_num_groups {self.norm_num_groups}")
        if tuple(self.patch_size) != (_PATCH, _PATCH):
            raise ValueError(f"AutoencoderKLFlux2: unsupported patch_size {tuple(self.patch_size)}: the FLUX.2 "
                             f"pipelines patchify latents {_PATCH}x{_PATCH}")

    @classmethod
    def from_dict(cls, config: dict, source: str | None = None) -> "AutoencoderKLFlux2Config":
        return config_from_dict(cls, config, source)

    @property
    def scale_factor_spatial(self) -> int:
        """Image pixels per VAE-latent pixel along each side (8); the transformer's tokens are 2x coarser."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        return self.decoder_block_out_channels or self.block_out_channels

    @property
    def patched_channels(self) -> int:
        """Channels of the patchified latents the transformer sees (128)."""
        return self.latent_channels * _PATCH * _PATCH


def patchify(latents: mx.array) -> mx.array:
    """(B, C, H, W) -> (B, 4C, H/2, W/2), channel c * 4 + 2 * dy + dx, as the pipelines' _patchify_latents."""
    if latents.ndim != 4 or latents.shape[2] % _PATCH or latents.shape[3] % _PATCH:
        raise ValueError(f"patchify: latents must be NCHW with even height and width, got shape {tuple(latents.shape)}")
    batch, channels, height, width = latents.shape
    x = latents.reshape(batch, channels, height // _PATCH, _PATCH, width // _PATCH, _PATCH)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(batch, channels * _PATCH**2, height // _PATCH, width // _PATCH)


def unpatchify(latents: mx.array) -> mx.array:
    """(B, 4C, h, w) -> (B, C, 2h, 2w), the inverse of `patchify` (the pipelines' _unpatchify_latents)."""
    if latents.ndim != 4 or latents.shape[1] % _PATCH**2:
        raise ValueError(
            f"unpatchify: latents must be NCHW with a multiple of 4 channels, got shape {tuple(latents.shape)}")
    batch, channels, height, width = latents.shape
    x = latents.reshape(batch, channels // _PATCH**2, _PATCH, _PATCH, height, width)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(batch, channels // _PATCH**2, height * _PATCH, width * _PATCH)


def pack_latents(latents: mx.array) -> mx.array:
    """(B, C, h, w) -> (B, h * w, C) tokens, row-major, as the pipelines' _pack_latents."""
    if latents.ndim != 4:
        raise ValueError(f"pack_latents: latents must be NCHW, got shape {tuple(latents.shape)}")
    batch, channels, height, width = latents.shape
    return latents.reshape(batch, channels, height * width).transpose(0, 2, 1)


def unpack_latents(tokens: mx.array, height: int, width: int) -> mx.array:
    """(B, h * w, C) -> (B, C, h, w): the pipelines' _unpack_latents_with_ids for the generated image's
    ids (_prepare_latent_ids, row-major), where the scatter is a reshape."""
    if tokens.ndim != 3 or tokens.shape[1] != height * width:
        raise ValueError(f"unpack_latents: tokens must be (B, {height} * {width}, C), got shape {tuple(tokens.shape)}")
    return tokens.transpose(0, 2, 1).reshape(tokens.shape[0], tokens.shape[2], height, width)


class LatentBatchNorm(nn.Module):
    """The checkpoint's `bn` (BatchNorm2d without affine): its running statistics normalise the patchified
    latents. Only the statistics are kept; num_batches_tracked and momentum matter to training alone."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.running_mean = mx.zeros((channels,))
        self.running_var = mx.ones((channels,))
        self.freeze()

    def _stats(self, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        # diffusers: sqrt(running_var + eps) in the statistics' dtype, then both cast to the latents' dtype.
        mean = self.running_mean.astype(dtype).reshape(1, -1, 1, 1)
        std = mx.sqrt(self.running_var + self.eps).astype(dtype).reshape(1, -1, 1, 1)
        return mean, std

    def normalize(self, latents: mx.array) -> mx.array:
        mean, std = self._stats(latents.dtype)
        return (latents - mean) / std

    def denormalize(self, latents: mx.array) -> mx.array:
        mean, std = self._stats(latents.dtype)
        return latents * std + mean


class AutoencoderKLFlux2(AutoencoderKL):
    """AutoencoderKL's encoder, decoder, quant convs and tiling, plus the `bn` statistics and the pipelines'
    latent space: `decode_latents` and `encode_image` speak normalised, patchified (B, 128, h, w) latents."""

    def __init__(self, config: AutoencoderKLFlux2Config):
        super().__init__(config)
        self.bn = LatentBatchNorm(config.patched_channels, config.batch_norm_eps)

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """AutoencoderKL's layout changes; bn.num_batches_tracked (an int64 step counter) is dropped."""
        kept = {k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}
        return AutoencoderKL.sanitize(kept)

    def _check_patched(self, latents: mx.array) -> mx.array:
        channels = self.config.patched_channels
        if latents.ndim != 4 or latents.shape[1] != channels:
            raise ValueError(f"AutoencoderKLFlux2: patchified latents must be NCHW with {channels} channels, "
                             f"got shape {tuple(latents.shape)}")
        return latents

    def normalize(self, latents: mx.array) -> mx.array:
        """Patchified VAE latents (B, 128, h, w) -> the transformer's space: (x - mean) / sqrt(var + eps)."""
        return self.bn.normalize(self._check_patched(latents))

    def denormalize(self, latents: mx.array) -> mx.array:
        """The transformer's (B, 128, h, w) latents -> patchified VAE latents: x * sqrt(var + eps) + mean."""
        return self.bn.denormalize(self._check_patched(latents))

    def decode_latents(self, latents: mx.array, tiled: bool | None = False,
                       tile_sample_size: int | None = None) -> mx.array:
        """Normalised patchified latents (B, 128, h, w) -> images (B, 16h, 16w, out_channels) in about [-1, 1],
        unclipped: the pipelines' denormalise, unpatchify, vae.decode. `tiled`: False full decode, True tiled
        (diffusers' tiled_decode on the unpatchified latents), None tiled only above one tile."""
        z = unpatchify(self.denormalize(latents))
        return self._decode_maybe_tiled(z.transpose(0, 2, 3, 1), tiled, tile_sample_size)

    def encode_image(self, images: mx.array, tiled: bool | None = False,
                     tile_sample_size: int | None = None) -> mx.array:
        """Images (B, H, W, in_channels) in [-1, 1], H and W multiples of 16 -> normalised patchified latents
        (B, 128, H/16, W/16), as the pipelines' _encode_vae_image (posterior mode, i.e. its mean; no noise)."""
        images = self._check(images, self.config.in_channels, "images", "NHWC")
        multiple = self.config.scale_factor_spatial * _PATCH
        if images.shape[1] % multiple or images.shape[2] % multiple:
            raise ValueError(f"AutoencoderKLFlux2: image height and width must be multiples of {multiple}, "
                             f"got shape {tuple(images.shape)}")
        mean, _ = self._encode_maybe_tiled(images, tiled, tile_sample_size)
        return self.bn.normalize(patchify(mean.transpose(0, 3, 1, 2)))


def load_flux2_vae(model_dir: str | Path, dtype: mx.Dtype | None = None, component: str = "vae") -> AutoencoderKLFlux2:
    """The `vae/` folder of a FLUX.2 diffusers-layout model (config.json + diffusion_pytorch_model.safetensors)."""
    return load_component(
        Path(model_dir), component, lambda config: AutoencoderKLFlux2(AutoencoderKLFlux2Config.from_dict(config)),
        sanitize=AutoencoderKLFlux2.sanitize, dtype=dtype,
    )
