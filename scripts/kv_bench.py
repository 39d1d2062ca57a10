"""Benchmark: klein editing with reference keys and values kept (the KV path) against the plain edit path, which
runs the reference tokens through every block at every step; 1 and 3 references.

The model is bench.py's random mid-size klein (built on first use under --cache); the KV folder beside it holds
the same weights, its model_index.json naming Flux2KleinKVPipeline (the timing is what differs, not the
weights). Reported: denoising seconds per image and per step, median of --reps, KV speed-up.

    python scripts/kv_bench.py [--size 512] [--steps 4] [--reps 3] [--references 1 3]
"""

import argparse
import json
import statistics
from pathlib import Path

import mlximg  # first: on Linux it preloads OpenBLAS, which only works before mlx is imported
import numpy as np
from bench import MID, denoise_seconds, model_folder
from PIL import Image


def kv_folder(folder: Path) -> Path:
    """`folder`'s components, linked, under a model_index.json that names the KV pipeline."""
    kv = folder.with_name(folder.name + "-kv")
    kv.mkdir(exist_ok=True)
    for component in folder.iterdir():
        if component.is_dir() and not (kv / component.name).exists():
            (kv / component.name).symlink_to(component.resolve(), target_is_directory=True)
    index = json.loads((folder / "model_index.json").read_text())
    index.pop("is_distilled", None)
    (kv / "model_index.json").write_text(json.dumps({**index, "_class_name": "Flux2KleinKVPipeline"}))
    return kv


def edit_seconds(pipeline, references, size: int, steps: int) -> float:
    return denoise_seconds(pipeline, "the cat from image 1 as a wizard", image=references, width=size, height=size,
                           steps=steps, guidance=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/mlximg-bench"), help="where the model is built")
    parser.add_argument("--size", type=int, default=512, help="output and reference side in pixels")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--references", type=int, nargs="+", default=[1, 3])
    args = parser.parse_args()
    folder = model_folder(args.cache, "klein", MID["klein"])
    pipelines = {"plain": mlximg.load(str(folder), keep_text_encoder=True),
                 "kv": mlximg.load(str(kv_folder(folder)), keep_text_encoder=True)}
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
              for _ in range(max(args.references))]
    print(f"FLUX.2 klein mid model (bench.py), random weights; {args.size}x{args.size} output and references, "
          f"{args.steps} steps, float32, median of {args.reps}", flush=True)
    print(f"{'references':<12}{'plain s':>9}{'KV s':>8}{'plain s/step':>14}{'KV s/step':>11}{'KV speed-up':>13}")
    for count in args.references:
        times = {name: [] for name in pipelines}
        for pipeline in pipelines.values():
            edit_seconds(pipeline, images[:count], args.size, 1)  # warm-up
        for _ in range(args.reps):  # alternating, so that the machine's drift falls on both alike
            for name, pipeline in pipelines.items():
                times[name].append(edit_seconds(pipeline, images[:count], args.size, args.steps))
        plain, kv = statistics.median(times["plain"]), statistics.median(times["kv"])
        print(f"{count:<12}{plain:>9.2f}{kv:>8.2f}{plain / args.steps:>14.3f}{kv / args.steps:>11.3f}"
              f"{plain / kv:>12.2f}x", flush=True)


if __name__ == "__main__":
    main()
