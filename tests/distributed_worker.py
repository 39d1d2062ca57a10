"""Run by mlx.launch in tests/test_distributed.py (not a test module): one rank of a tensor- or data-parallel
generation through the Python API. Every rank prints one JSON line (its rank, the bytes it keeps per component);
rank 0 saves the images as .npy files."""

import argparse
import json
from pathlib import Path

import numpy as np

import mlximg
from mlximg.distributed import world
from mlximg.distributed.data import generate_shared


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("mode", choices=["tensor", "data"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--settings", type=json.loads, default={})
    parser.add_argument("--load", type=json.loads, default={}, help="mlximg.load's options (quantize, fp8, ...)")
    args = parser.parse_args()
    group = world()
    pipeline = mlximg.load(args.model, distributed=args.mode, keep_text_encoder=True, **args.load)
    if args.mode == "data":
        images = generate_shared(pipeline, "a red fox", args.seeds, group, **args.settings)
    else:
        images = pipeline.generate("a red fox", seed=args.seeds, **args.settings)
    print(json.dumps({"rank": group.rank(), "size": group.size(), "owners": pipeline.tracker.owners()}), flush=True)
    if group.rank() == 0:
        for seed, image in zip(args.seeds, images):
            np.save(args.out / f"{seed}.npy", np.asarray(image))


if __name__ == "__main__":
    main()
