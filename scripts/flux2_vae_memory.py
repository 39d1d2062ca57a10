"""Peak MLX memory and time of a full against a tiled FLUX.2 VAE decode, with the released FLUX.2 VAE config.

Random weights (no download): memory and time depend on shapes only. The decode is the pipelines' end of
generation: normalised patchified latents (1, 128, H/16, W/16) -> denormalise, unpatchify, decode. Prints one
line per decode and the difference between the two images.

    python scripts/flux2_vae_memory.py                        # 1024x1024, float32, 512-pixel tiles
    python scripts/flux2_vae_memory.py --size 768 --tile 384 --dtype bfloat16
"""

import argparse
import platform
import time

import mlximg  # noqa: F401  (before mlx: preloads the system BLAS on Linux)
import mlx.core as mx
import numpy as np

from mlximg.models.flux2_vae import AutoencoderKLFlux2, AutoencoderKLFlux2Config
from mlximg.runtime import backend, nbytes

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
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels, a multiple of 16 (default 1024)")
    parser.add_argument("--tile", type=int, default=512, help="tile side in pixels for the tiled decode (default 512)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()

    config = AutoencoderKLFlux2Config()  # the released FLUX.2 vae/config.json equals the defaults
    model = AutoencoderKLFlux2(config)
    model.set_dtype(getattr(mx, args.dtype))
    model.encoder = None  # decode only: the encoder's weights are not part of the measurement
    model.quant_conv = None
    mx.eval(model.parameters())
    side = args.size // (2 * config.scale_factor_spatial)
    latents = mx.random.normal((1, config.patched_channels, side, side), key=mx.random.key(0))
    mx.eval(latents)
    print(f"mlx {mx.__version__} ({backend()}), {platform.processor() or platform.machine()}, {args.dtype}, "
          f"image {args.size}x{args.size} (latents {config.patched_channels}x{side}x{side}), "
          f"decoder weights {nbytes(model) / MIB:.0f} MiB")

    full = measure("full decode", lambda: model.decode_latents(latents, tiled=False))
    tiled = measure(f"tiled decode ({args.tile} px tiles)",
                    lambda: model.decode_latents(latents, tiled=True, tile_sample_size=args.tile))
    difference = np.abs(tiled - full)
    print(f"tiled vs full: max abs difference {difference.max():.4g}, mean {difference.mean():.4g}, "
          f"max |full| {np.abs(full).max():.4g}")


if __name__ == "__main__":
    main()
