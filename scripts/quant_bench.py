"""Benchmark: resident transformer memory and denoising time per step for each weight mode on the CPU, dequantized
at load (float weights in memory) against dequantized layer by layer (quantized weights in memory), on bench.py's
random mid-size Z-Image (built on first use under --cache), quantized at load.

    python scripts/quant_bench.py [--size 512] [--steps 2] [--reps 2] [--modes mxfp8 mxfp4 affine4 affine8]
"""

import argparse
import statistics
from pathlib import Path

import mlximg  # first: on Linux it preloads OpenBLAS, which only works before mlx is imported
from bench import MID, model_folder, step_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/mlximg-bench"), help="where the model is built")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["mxfp8", "mxfp4", "nvfp4", "affine4", "affine8"])
    args = parser.parse_args()
    folder = str(model_folder(args.cache, "zimage", MID["zimage"]))
    print(f"Z-Image mid model (bench.py), random weights; {args.size}x{args.size}, {args.steps} steps, float32, "
          f"median of {args.reps}")
    print(f"{'mode':<9}{'path':<12}{'transformer MiB':>16}{'s / step':>10}{'vs float':>10}")
    runs = [(None, "dequantize")] + [(mode, path) for mode in args.modes for path in ("dequantize", "layerwise")]
    base = None
    for mode, path in runs:
        pipeline = mlximg.load(folder, quantize=mode, fp8=path, keep_text_encoder=True)
        step_seconds(pipeline, args.size, 1)  # warm-up
        seconds = statistics.median(step_seconds(pipeline, args.size, args.steps) for _ in range(args.reps))
        base = base or seconds
        resident = pipeline.tracker.nbytes("transformer") / 2**20
        print(f"{mode or 'float':<9}{path if mode else '-':<12}{resident:>16.1f}{seconds:>10.3f}{seconds / base:>10.2f}",
              flush=True)
        del pipeline


if __name__ == "__main__":
    main()
