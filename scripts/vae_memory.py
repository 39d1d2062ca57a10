"""Peak MLX memory and time of a full against a tiled VAE decode, with a released VAE config.

flux1: Z-Image's (FLUX.1) AutoencoderKL; flux2: FLUX.2's AutoencoderKLFlux2, decoding as the pipelines end a
generation (normalised patchified latents (1, 128, H/16, W/16) -> denormalise, unpatchify, decode).
Random weights (no download): memory and time depend on shapes only. Prints one line per decode and the
difference between the two images.

    python scripts/vae_memory.py                        # flux1, 1024x1024, float32, 512-pixel tiles
    python scripts/vae_memory.py --vae flux2 --size 768 --tile 384 --dtype bfloat16
"""

import argparse
import platform
import time

import mlximg  # noqa: F401  (before mlx: preloads the system BLAS on Linux)
import mlx.core as mx
import numpy as np

from mlximg.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from mlximg.models.flux2_vae import AutoencoderKLFlux2, AutoencoderKLFlux2Config
from mlximg.runtime import backend, nbytes

# Z-Image-Turbo's vae/config.json.
REAL_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.3611,
    "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True,
}
MIB = 2**20


def measure(label: str, decode) -> np.ndarray:
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    start = time.perf_counter()
    image = decode()
    mx.eval(image)
    seconds = time.perf_counter() - start
    peak = mx.get_peak_memory()
    print(f"{label:>28}: {seconds:7.1f} s  peak {peak / MIB:8.0f} MiB  (+{(peak - before) / MIB:.0f} MiB over weights "
          f"and latents)", flush=True)
    return np.array(image.astype(mx.float32))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    parser.add_argument("--tile", type=int, default=512, help="tile side in pixels for the tiled decode (default 512)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--vae", default="flux1", choices=["flux1", "flux2"])
    args = parser.parse_args()

    if args.vae == "flux1":
        config = AutoencoderKLConfig.from_dict(REAL_CONFIG)
        model = AutoencoderKL(config)
        side, channels = args.size // config.scale_factor_spatial, config.latent_channels
    else:
        config = AutoencoderKLFlux2Config()  # the released FLUX.2 vae/config.json equals the defaults
        model = AutoencoderKLFlux2(config)
        side, channels = args.size // (2 * config.scale_factor_spatial), config.patched_channels
    model.set_dtype(getattr(mx, args.dtype))
    model.encoder = None  # decode only: the encoder's weights are not part of the measurement
    if "quant_conv" in model:
        model.quant_conv = None
    mx.eval(model.parameters())
    latents = mx.random.normal((1, channels, side, side), key=mx.random.key(0))
    mx.eval(latents)
    print(f"mlx {mx.__version__} ({backend()}), {platform.processor() or platform.machine()}, {args.vae} VAE, "
          f"{args.dtype}, image {args.size}x{args.size} (latents {channels}x{side}x{side}), "
          f"decoder weights {nbytes(model) / MIB:.0f} MiB")

    full = measure("full decode", lambda: model.decode_latents(latents, tiled=False))
    tiled = measure(f"tiled decode ({args.tile} px tiles)",
                    lambda: model.decode_latents(latents, tiled=True, tile_sample_size=args.tile))
    difference = np.abs(tiled - full)
    print(f"tiled vs full: max abs difference {difference.max():.4g}, mean {difference.mean():.4g}, "
          f"max |full| {np.abs(full).max():.4g}")


if __name__ == "__main__":
    main()
