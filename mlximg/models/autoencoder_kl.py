"""AutoencoderKL, the FLUX.1-style VAE that Z-Image uses, in the diffusers checkpoint layout.

Module paths equal the diffusers keys (encoder.down_blocks.0.resnets.1.norm2.weight, ...), so `sanitize` only
changes layouts: 3x3 convolutions OIHW -> OHWI, 1x1 convolutions -> Linear. Activations are NHWC inside;
`decode_latents` and `encode_image` speak the pipelines' NCHW latents and the scaling / shift of vae/config.json.
"""

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..configs import at_least, check_fields, from_dict
from ..loading import load_component
from ..nn import attention, dispatch, native, silu

_DOWN_BLOCKS = ("DownEncoderBlock2D",)
_UP_BLOCKS = ("UpDecoderBlock2D",)
_ACTIVATIONS = ("silu", "swish")
_EPS = 1e-6  # diffusers' Encoder / Decoder pass resnet_eps=1e-6 to every norm
_LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution clamps the log-variance
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_SHIFTED_CONV_MIN_CHANNELS = 32  # below this, mlx's unfolded input is small and one matmul beats nine
# Below this many pixels too: at 32x32 conv2d's unfold is cheap and its backward ~2x faster (training the tiny VAE).
_SHIFTED_CONV_MIN_PIXELS = 64 * 64


def config_from_dict(cls, config: dict, source: str | None = None):
    """A VAE config dataclass from config.json; keys it lacks (_class_name, _diffusers_version, ...) are ignored."""
    if isinstance(config, dict) and isinstance(config.get("sample_size"), list) and config["sample_size"]:
        config = {**config, "sample_size": config["sample_size"][0]}  # diffusers tiles with the first entry
    return from_dict(cls, config, source)


@dataclass
class AutoencoderKLConfig:
    """Field names and defaults of diffusers' AutoencoderKL config.json."""

    in_channels: int = at_least(1, default=3)
    out_channels: int = at_least(1, default=3)
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = at_least(1, default=(64,))
    layers_per_block: int = at_least(1, default=1)
    act_fn: str = "silu"
    latent_channels: int = at_least(1, default=4)
    norm_num_groups: int = at_least(1, default=32)
    sample_size: int = at_least(1, default=32)
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        check_fields(self)
        validate_blocks(self, "AutoencoderKL")
        if self.scaling_factor == 0:
            raise ValueError("AutoencoderKL: scaling_factor must not be 0 (latents are divided by it)")

    @classmethod
    def from_dict(cls, config: dict, source: str | None = None) -> "AutoencoderKLConfig":
        return config_from_dict(cls, config, source)

    @property
    def scale_factor_spatial(self) -> int:
        """Image pixels per latent pixel along each side (8 for the FLUX.1 VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        """The decoder's block widths, encoder order (AutoencoderKLFlux2 may give its own)."""
        return self.block_out_channels


def validate_blocks(config, name: str) -> None:
    """The checks every Encoder / Decoder config needs: block types, equal depths, activation, group widths."""
    unsupported = [t for t in config.down_block_types if t not in _DOWN_BLOCKS]
    unsupported += [t for t in config.up_block_types if t not in _UP_BLOCKS]
    if unsupported:
        raise ValueError(f"{name}: unsupported block types {unsupported} (supported: {_DOWN_BLOCKS + _UP_BLOCKS})")
    depth = len(config.block_out_channels)
    if depth == 0 or len(config.down_block_types) != depth or len(config.up_block_types) != depth:
        raise ValueError(
            f"{name}: down_block_types {config.down_block_types}, up_block_types {config.up_block_types} and "
            f"block_out_channels {config.block_out_channels} must have the same, non-zero length")
    if config.act_fn not in _ACTIVATIONS:
        raise ValueError(f"{name}: unsupported act_fn {config.act_fn!r} (supported: {_ACTIVATIONS})")
    odd = [c for c in config.block_out_channels if c % config.norm_num_groups]
    if odd:
        raise ValueError(f"{name}: block_out_channels {odd} not divisible by norm_num_groups {config.norm_num_groups}")


class GroupNorm(nn.Module):
    """GroupNorm over the channels of NHWC input, PyTorch's channel grouping. On the CPU in float32, native.py's
    kernel (double accumulators); elsewhere the MLX ops below, statistics in float32:

    mlx's float32 sums accumulate sequentially: over the ~4M values of a group of a 1024x1024 decode that is a
    ~5e-4 relative error in the variance. Summing channels, then columns, then rows keeps each run short (torch
    agrees with float64 to ~1e-6). Mean and variance are two-pass, as `mx.var` is one-pass and loses digits
    when |mean| >> std, and normalisation and affine fold into one multiply-add, with no transposed copy.
    """

    def __init__(self, num_groups: int, dims: int, eps: float = _EPS):
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.weight = mx.ones((dims,))
        self.bias = mx.zeros((dims,))

    def __call__(self, x: mx.array, then_silu: bool = False) -> mx.array:
        """GroupNorm of x (B, H, W, C), followed by SiLU if `then_silu` (one pass of native.py's kernel)."""

        def in_mlx(x, weight, bias):
            out = self._normalize(x, weight, bias)
            return silu(out) if then_silu else out

        if dispatch.op_path(x, self.weight, self.bias) == "native":
            return native.group_norm(x, self.weight, self.bias, self.num_groups, self.eps, then_silu, in_mlx)
        return in_mlx(x, self.weight, self.bias)

    def _normalize(self, x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
        batch, height, width, channels = x.shape
        values = x.reshape(batch, height, width, self.num_groups, -1).astype(mx.float32)
        mean = _group_mean(values)
        var = _group_mean(mx.square(values - mean))
        affine_shape = values.shape[3:]
        scale = mx.rsqrt(var + self.eps) * weight.astype(mx.float32).reshape(affine_shape)
        shift = bias.astype(mx.float32).reshape(affine_shape) - mean * scale
        return (values * scale + shift).astype(x.dtype).reshape(x.shape)


def _group_mean(values: mx.array) -> mx.array:
    """Mean of (B, H, W, G, C/G) over H, W and C/G, one axis at a time (short float32 accumulations)."""
    total = mx.sum(mx.sum(mx.sum(values, axis=4, keepdims=True), axis=2, keepdims=True), axis=1, keepdims=True)
    return total / (values.shape[1] * values.shape[2] * values.shape[4])


def _shifted_conv3x3(x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
    """3x3 convolution, stride 1, zero padding 1, as nine matmuls accumulated in place (addmm).

    In the flattened padded image (row width W + 2) the input under tap (dy, dx) of every output pixel is one
    contiguous row range, offset dy * (W + 2) + dx, so no unfolded copy is made; each output row carries two
    wrap-around columns that are cut at the end.
    """
    batch, height, width, channels = x.shape
    row = width + 2
    # One extra bottom row keeps the last tap's range inside the buffer.
    flat = mx.pad(x, [(0, 0), (1, 2), (1, 1), (0, 0)]).reshape(batch, -1, channels)
    taps = weight.transpose(1, 2, 3, 0)  # (3, 3, in, out): taps[dy, dx] is a transposed view, no copy
    images = []
    for image in flat:
        out = bias
        for dy in range(3):
            for dx in range(3):
                start = dy * row + dx
                out = mx.addmm(out, image[start : start + height * row], taps[dy, dx])
        images.append(out.reshape(height, row, -1)[:, :width])
    return mx.stack(images)


class Conv3x3(nn.Conv2d):
    """nn.Conv2d(kernel 3, padding 1). On the CPU in float32 it runs as native.py's kernel (bands of unfolded rows,
    one matmul each), or where that is not built as `_shifted_conv3x3`: mlx's CPU conv2d unfolds its whole input
    (9x its size; 9 GiB for one layer of a 1024x1024 decode), this needs the padded input only. Half precision
    keeps conv2d: nine addmm would round the running sum to half precision nine times."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        path = dispatch.op_path(x, self.weight, self.bias)
        if path == "native":
            return native.conv3x3(x, self.weight, self.bias, self._in_mlx)
        if path == "fast":
            return self._in_mlx(x, self.weight, self.bias)
        return mx.conv2d(x, self.weight, padding=1) + self.bias

    @staticmethod
    def _in_mlx(x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
        """The CPU's MLX path (and the kernel's gradients): nine addmm where conv2d's unfolded input is large."""
        shifted = x.shape[-1] >= _SHIFTED_CONV_MIN_CHANNELS and x.shape[1] * x.shape[2] >= _SHIFTED_CONV_MIN_PIXELS
        return _shifted_conv3x3(x, weight, bias) if shifted else mx.conv2d(x, weight, padding=1) + bias


class ResnetBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels)
        self.conv1 = Conv3x3(in_channels, out_channels)
        self.norm2 = GroupNorm(groups, out_channels)
        self.conv2 = Conv3x3(out_channels, out_channels)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Linear(in_channels, out_channels)  # a 1x1 conv

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(self.norm1(x, then_silu=True))
        h = self.conv2(self.norm2(h, then_silu=True))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """The VAE mid-block's single-head self-attention over all pixels, with its own GroupNorm and residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]

    def __call__(self, x: mx.array) -> mx.array:
        batch, height, width, channels = x.shape
        h = self.group_norm(x).reshape(batch, 1, height * width, channels)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        return x + self.to_out[0](attention(q, k, v)).reshape(x.shape)


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        # diffusers pads only bottom and right (downsample_padding=0 in the Encoder).
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv3x3(channels, channels)

    def __call__(self, x: mx.array) -> mx.array:
        batch, height, width, channels = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None], (batch, height, 2, width, 2, channels))
        return self.conv(x.reshape(batch, 2 * height, 2 * width, channels))


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(out_channels if i else in_channels, out_channels, groups) for i in range(layers)]
        self.downsamplers = [Downsample2D(out_channels)] if downsample else []

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.resnets + self.downsamplers:
            x = layer(x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(out_channels if i else in_channels, out_channels, groups) for i in range(layers)]
        self.upsamplers = [Upsample2D(out_channels)] if upsample else []

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.resnets + self.upsamplers:
            x = layer(x)
        return x


class UNetMidBlock2D(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(channels, channels, groups) for _ in range(2)]
        self.attentions = [Attention(channels, groups)] if attention else []

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        for self_attention in self.attentions:
            x = self_attention(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        last = len(channels) - 1
        self.conv_in = Conv3x3(config.in_channels, channels[0])
        self.down_blocks = [
            DownEncoderBlock2D(channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups, i < last)
            for i in range(len(channels))
        ]
        self.mid_block = UNetMidBlock2D(channels[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, channels[-1])
        self.conv_out = Conv3x3(channels[-1], 2 * config.latent_channels)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x, then_silu=True))


class Decoder(nn.Module):
    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        channels, groups = config.decoder_channels[::-1], config.norm_num_groups
        last = len(channels) - 1
        self.conv_in = Conv3x3(config.latent_channels, channels[0])
        self.mid_block = UNetMidBlock2D(channels[0], groups, config.mid_block_add_attention)
        self.up_blocks = [
            UpDecoderBlock2D(channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1, groups, i < last)
            for i in range(len(channels))
        ]
        self.conv_norm_out = GroupNorm(groups, channels[-1])
        self.conv_out = Conv3x3(channels[-1], config.out_channels)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x, then_silu=True))


def _blend(previous: mx.array, tile: mx.array, extent: int, axis: int) -> mx.array:
    """diffusers' blend_v / blend_h: fade the first `extent` rows (axis 1) or columns (axis 2) of `tile` in
    from the last ones of `previous`, with its float32-rounded weights y / extent."""
    extent = min(previous.shape[axis], tile.shape[axis], extent)
    if extent == 0:
        return tile
    ramp = np.arange(extent) / extent
    shape = [1, 1, 1, 1]
    shape[axis] = extent
    fade_in = mx.array(ramp.astype(np.float32).reshape(shape))
    fade_out = mx.array((1 - ramp).astype(np.float32).reshape(shape))
    tail = mx.split(previous, [previous.shape[axis] - extent], axis=axis)[1]
    head, rest = mx.split(tile, [extent], axis=axis)
    mixed = (tail.astype(mx.float32) * fade_out + head.astype(mx.float32) * fade_in).astype(tile.dtype)
    return mx.concatenate([mixed, rest], axis=axis)


def _tiled(fn, x: mx.array, tile_in: int, tile_out: int, overlap: float) -> mx.array:
    """diffusers' tiling (AutoencoderKL.tiled_decode / _tiled_encode) in NHWC: run `fn` on tiles of `tile_in`
    pixels every tile_in * (1 - overlap), blend each with its blended upper and left neighbours, keep the
    first tile_out - blend rows and columns of each."""
    stride = int(tile_in * (1 - overlap))
    extent = int(tile_out * overlap)
    keep = tile_out - extent
    if stride <= 0 or keep <= 0:
        raise ValueError(f"tiling: tile {tile_in} with overlap {overlap} leaves no stride or nothing to keep")
    rows = []
    for top in range(0, x.shape[1], stride):
        row = []
        for left in range(0, x.shape[2], stride):
            tile = fn(x[:, top : top + tile_in, left : left + tile_in])
            if rows:
                tile = _blend(rows[-1][len(row)], tile, extent, axis=1)
            if row:
                tile = _blend(row[-1], tile, extent, axis=2)
            mx.eval(tile)  # one tile's activations at a time: that is the point of tiling
            row.append(tile)
        rows.append(row)
    return mx.concatenate([mx.concatenate([t[:, :keep, :keep] for t in row], axis=2) for row in rows], axis=1)


class AutoencoderKL(nn.Module):
    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        latent = config.latent_channels
        if config.use_quant_conv:
            self.quant_conv = nn.Linear(2 * latent, 2 * latent)  # 1x1 convs
        if config.use_post_quant_conv:
            self.post_quant_conv = nn.Linear(latent, latent)

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """diffusers keys -> module paths: conv weights OIHW -> OHWI, 1x1 convs -> Linear (O, I); pre-0.14
        attention names renamed as diffusers renames them on load."""
        sanitized = {}
        for key, value in weights.items():
            parts = key.split(".")
            if "attentions" in parts and parts[-2] in _LEGACY_ATTENTION:
                key = ".".join([*parts[:-2], _LEGACY_ATTENTION[parts[-2]], parts[-1]])
            if value.ndim == 4:  # made contiguous once here, not copied by every convolution
                value = mx.contiguous(value.transpose(0, 2, 3, 1))
                if value.shape[1:3] == (1, 1):
                    value = value.reshape(value.shape[0], value.shape[3])
            sanitized[key] = value
        return sanitized

    @property
    def dtype(self) -> mx.Dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def tile_sample_size(self) -> int:
        return self.config.sample_size

    def _check(self, x: mx.array, channels: int, what: str, layout: str) -> mx.array:
        if x.ndim != 4 or x.shape[-1 if layout == "NHWC" else 1] != channels:
            raise ValueError(
                f"{type(self).__name__}: {what} must be {layout} with {channels} channels, got shape {tuple(x.shape)}")
        return x.astype(self.dtype)

    # NHWC core

    def decode(self, z: mx.array) -> mx.array:
        """Latents (B, h, w, latent_channels), already unscaled -> images (B, H, W, out_channels)."""
        z = self._check(z, self.config.latent_channels, "latents", "NHWC")
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _moments(self, x: mx.array) -> mx.array:
        x = self._check(x, self.config.in_channels, "images", "NHWC")
        moments = self.encoder(x)
        return self.quant_conv(moments) if "quant_conv" in self else moments

    @staticmethod
    def _split_moments(moments: mx.array) -> tuple[mx.array, mx.array]:
        mean, logvar = mx.split(moments, 2, axis=-1)
        return mean, mx.clip(logvar, *_LOGVAR_RANGE)

    def encode(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Images (B, H, W, in_channels) in [-1, 1] -> posterior (mean, logvar), each (B, h, w, latent_channels)."""
        return self._split_moments(self._moments(x))

    def tiled_decode(self, z: mx.array, tile_sample_size: int | None = None, overlap: float = 0.25) -> mx.array:
        """`decode` tile by tile, as diffusers' AutoencoderKL.tiled_decode; tiles default to config.sample_size."""
        tile_sample = tile_sample_size or self.tile_sample_size
        tile_latent = int(tile_sample / self.config.scale_factor_spatial)
        return _tiled(self.decode, z, tile_latent, tile_sample, overlap)

    def tiled_encode(self, x: mx.array, tile_sample_size: int | None = None, overlap: float = 0.25):
        """`encode` tile by tile, as diffusers' AutoencoderKL._tiled_encode (moments are blended)."""
        tile_sample = tile_sample_size or self.tile_sample_size
        tile_latent = int(tile_sample / self.config.scale_factor_spatial)
        return self._split_moments(_tiled(self._moments, x, tile_sample, tile_latent, overlap))

    # The pipelines' side: NCHW latents in the diffusion model's scale

    def _use_tiles(self, tiled: bool | None, height: int, width: int, tile: int) -> bool:
        # None: diffusers' enable_tiling() rule, tile only what is larger than one tile.
        return max(height, width) > tile if tiled is None else tiled

    def decode_latents(self, latents: mx.array, tiled: bool | None = False,
                       tile_sample_size: int | None = None) -> mx.array:
        """(B, latent_channels, h, w) diffusion latents -> (B, H, W, out_channels) images in about [-1, 1],
        unclipped. `tiled`: False full decode, True tiled, None tiled only above one tile (tile_sample_size)."""
        if latents.ndim != 4 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(f"AutoencoderKL: latents must be NCHW with {self.config.latent_channels} channels, "
                             f"got shape {tuple(latents.shape)}")
        shift = self.config.shift_factor or 0.0
        # Cast before scaling, in the pipelines' order (latents.to(vae.dtype) / scaling_factor + shift_factor).
        z = (latents.astype(self.dtype) / self.config.scaling_factor + shift).transpose(0, 2, 3, 1)
        return self._decode_maybe_tiled(z, tiled, tile_sample_size)

    def _decode_maybe_tiled(self, z: mx.array, tiled: bool | None, tile_sample_size: int | None) -> mx.array:
        """`decode` or `tiled_decode` of NHWC latents, by the `tiled` rule of `_use_tiles`."""
        tile = tile_sample_size or self.tile_sample_size
        if self._use_tiles(tiled, z.shape[1], z.shape[2], int(tile / self.config.scale_factor_spatial)):
            return self.tiled_decode(z, tile)
        return self.decode(z)

    def _encode_maybe_tiled(self, images: mx.array, tiled: bool | None,
                            tile_sample_size: int | None) -> tuple[mx.array, mx.array]:
        """`encode` or `tiled_encode` of NHWC images, by the `tiled` rule of `_use_tiles`."""
        tile = tile_sample_size or self.tile_sample_size
        if self._use_tiles(tiled, images.shape[1], images.shape[2], tile):
            return self.tiled_encode(images, tile)
        return self.encode(images)

    def encode_image(self, images: mx.array, noise: mx.array | None = None, tiled: bool | None = False,
                     tile_sample_size: int | None = None) -> mx.array:
        """(B, H, W, in_channels) images in [-1, 1] -> (B, latent_channels, h, w) diffusion latents,
        (z - shift_factor) * scaling_factor with z the posterior mean, or mean + std * noise when `noise`
        (NCHW, like the result) is given, as the pipelines' retrieve_latents(sample_mode="sample")."""
        images = self._check(images, self.config.in_channels, "images", "NHWC")
        mean, logvar = self._encode_maybe_tiled(images, tiled, tile_sample_size)
        z = mean
        if noise is not None:
            expected = (mean.shape[0], mean.shape[3], mean.shape[1], mean.shape[2])
            if tuple(noise.shape) != expected:
                raise ValueError(
                    f"AutoencoderKL: noise must have the latents' shape {expected}, got {tuple(noise.shape)}")
            z = mean + mx.exp(0.5 * logvar) * noise.transpose(0, 2, 3, 1).astype(mean.dtype)
        shift = self.config.shift_factor or 0.0
        return ((z - shift) * self.config.scaling_factor).transpose(0, 3, 1, 2)


def load_autoencoder(model_dir: str | Path, dtype: mx.Dtype | None = None, component: str = "vae") -> AutoencoderKL:
    """The `vae/` folder of a diffusers-layout model (config.json + diffusion_pytorch_model.safetensors)."""
    return load_component(
        Path(model_dir), component, lambda config: AutoencoderKL(AutoencoderKLConfig.from_dict(config)),
        sanitize=AutoencoderKL.sanitize, dtype=dtype,
    )
